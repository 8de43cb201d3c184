"""The run loop and the Schema Registry: an outage holds input back, whole and
undecoded, and dead-letters nothing; the records are answered once it returns.
A record the registry has no schema for is dead-lettered with its bytes."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from daemon.core import codec
from daemon.core.processor import Processor
from daemon.core.state import StateStore
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.schemas import framing
from daemon.schemas.registry import RegistryRefused
from daemon.schemas.wire import value_formats
from daemon.streaming import registry as registry_module
from daemon.streaming.registry import wait_for_registry
from tests.support.backends import Memory
from tests.support.fakes import SumEngine
from tests.support.registry import StandInRegistry

ONE: dict[str, Any] = {
    "type": "record",
    "name": "One",
    "fields": [{"name": "x", "type": {"type": "array", "items": "double"}}],
}


def setup(tmp_path: Path, registry: StandInRegistry, values: list[bytes]) -> tuple[Memory, Any, Metrics]:
    kafka = Memory()
    s = kafka.settings(tmp_path, input_format="avro", schema_registry_url=registry.url)
    kafka.produce(s.input_topic, [(b"a", v, 0) for v in values])
    formats = value_formats(s, codec.Fields())
    metrics = Metrics()
    proc = Processor(
        SumEngine(), model_id="m@0", n_features=1, store=StateStore(0), metrics=metrics, wire=formats.wire
    )
    return kafka, kafka.loop(s, proc, metrics, formats), metrics


def test_an_outage_holds_input_back_and_dead_letters_nothing(tmp_path: Path) -> None:
    with StandInRegistry() as registry:
        serializer = AvroSerializer(SchemaRegistryClient({"url": registry.url}), orjson.dumps(ONE).decode())
        ctx = SerializationContext("in", MessageField.VALUE)
        values = [serializer({"x": [float(i)]}, ctx) or b"" for i in range(1, 6)]
        registry.stop()  # away before lstmd has read any schema
        kafka, loop, metrics = setup(tmp_path, registry, values)
        for _ in range(20):
            loop.step()
        assert kafka.values("out") == [] and kafka.values("in.dlq") == []
        assert (metrics.registry.get_sample_value("lstmd_schema_registry_unavailable_total") or 0) >= 1
        assert metrics.registry.get_sample_value("lstmd_schema_registry_waiting") == 1
        loop.health.model_loaded = True  # as the daemon says once its model is loaded
        ready, why = loop.health.ready()
        assert not ready and "schema registry" in why
        registry.start()  # back, on its port
        loop.gate.retry_at = 0.0  # the backoff has passed
        kafka.run_until([loop], lambda: len(kafka.values("out")) == 5)
        ys = [orjson.loads(v or b"")["y"] for v in kafka.values("out")]
        assert ys == [[1.0], [3.0], [6.0], [10.0], [15.0]]  # each step once, in order
        assert kafka.values("in.dlq") == []
        assert loop.health.blocked is None
        assert metrics.registry.get_sample_value("lstmd_schema_registry_waiting") == 0
        assert metrics.registry.get_sample_value("lstmd_schema_fetches_total") == 1


def test_records_the_registry_cannot_read_are_dead_lettered_with_their_bytes(tmp_path: Path) -> None:
    with StandInRegistry() as registry:
        sid = registry.register("in-value", "AVRO", ONE)
        good = framing.frame(sid, b"\x02\x00\x00\x00\x00\x00\x00\xf0\x3f\x00")  # x = [1.0]
        unknown = framing.frame(sid + 100, good[5:])
        plain = b'{"x": [1.0]}'
        kafka, loop, _ = setup(tmp_path, registry, [good, unknown, plain, good])
        kafka.run_until([loop], lambda: len(kafka.values("out")) == 2 and len(kafka.values("in.dlq")) == 2)
        assert kafka.values("in.dlq") == [unknown, plain]
        assert [orjson.loads(v or b"")["y"] for v in kafka.values("out")] == [[1.0], [2.0]]


def test_start_up_waits_for_the_registry_and_registers_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Away at start-up: retried (not ready, not dead); once it answers, the output's
    schema is registered under `<output>-value` before the daemon joins the group."""
    monkeypatch.setattr(registry_module, "FIRST_RETRY_S", 0.1)
    with StandInRegistry() as registry:
        kafka = Memory()
        s = kafka.settings(tmp_path, output_format="avro", schema_registry_url=registry.url)
        formats = value_formats(s, codec.Fields())
        registry.stop()
        stop, health = threading.Event(), Health(60)
        result: list[bool] = []
        waiting = threading.Thread(target=lambda: result.append(wait_for_registry(formats, stop, health)))
        waiting.start()
        time.sleep(0.4)  # at least two attempts, the first retried after 0.1 s
        assert waiting.is_alive() and health.reason == "waiting for the schema registry"
        registry.start()
        waiting.join(timeout=10)
        assert result == [True]
        assert formats.output is not None and registry.store.subjects == {"out-value": [formats.output.id]}


def test_start_up_ends_on_a_registry_that_refuses_the_credentials(tmp_path: Path) -> None:
    with StandInRegistry(username="lstmd", password="right") as registry:
        kafka = Memory()
        s = kafka.settings(
            tmp_path,
            input_format="avro",
            schema_registry_url=registry.url,
            schema_registry_username="lstmd",
            schema_registry_password="wrong",
        )
        with pytest.raises(RegistryRefused, match="LSTMD_SCHEMA_REGISTRY_USERNAME") as caught:
            wait_for_registry(value_formats(s, codec.Fields()), threading.Event(), Health(60))
        assert caught.value.exit_code == 2 and "wrong" not in str(caught.value)
