"""Avro and JSON Schema values with a Schema Registry, end to end through the real
broker: input written by Confluent's serializers and a librdkafka producer (as
Kafka shops write it), predictions checked against the oracle, a new compatible
schema version mid-stream, bad records dead-lettered with their bytes and a reason
each, and a registry outage that dead-letters nothing and delays everything.

The registry is tests/support/registry.py's stand-in (see there why not a real one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from daemon.devtools.localkafka import LocalKafka
from daemon.schemas import framing
from tests.support.librdkafka import Writer
from tests.support.models import built
from tests.support.registry import StandInRegistry
from tests.support.streams import (
    DaemonProcess,
    check_predictions,
    consume,
    daemon_env,
    interleaved_stream,
    scrape,
)

pytestmark = pytest.mark.kafka

READING: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "test.lstmd",
    "fields": [
        {"name": "x", "type": ["null", {"type": "array", "items": "double"}], "default": None},
        {"name": "step", "type": ["null", "long"], "default": None},
        {"name": "start", "type": ["null", "boolean"], "default": None},
        {"name": "end", "type": ["null", "boolean"], "default": None},
    ],
}
# The subject's version 2: a field added with a default, registered mid-stream.
READING_V2: dict[str, Any] = {
    **READING,
    "fields": [*READING["fields"], {"name": "site", "type": "string", "default": "lab"}],
}
READING_JSON: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "x": {"type": "array", "items": {"type": "number"}},
        "step": {"type": "integer"},
        "start": {"type": "boolean"},
        "end": {"type": "boolean"},
    },
}


@pytest.fixture(scope="module")
def model() -> Path:
    return built("stacked_lstm_gru")


@pytest.fixture
def registry() -> Iterator[StandInRegistry]:
    with StandInRegistry() as r:
        yield r


def full(value: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """An event as a record of `schema`: every field present (Avro has no absent fields)."""
    return {f["name"]: value.get(f["name"], f.get("default")) for f in schema["fields"]}


def produce_with(
    bootstrap: str, topic: str, events: list[tuple[str, bytes]], compression: str = "zstd"
) -> list[tuple[int, int]]:
    """librdkafka's producer, compressed: each event's (partition, offset)."""
    writer = Writer(bootstrap, **{"compression.type": compression})
    for i, (key, value) in enumerate(events):
        writer.write(topic, i, key.encode(), value)
    landed = writer.flush()
    return [landed[i] for i in range(len(events))]


def serve(
    kafka: LocalKafka,
    names: dict[str, str],
    model: Path,
    registry: StandInRegistry,
    predictions: int,
    dead_letters: int = 0,
    **env: str,
) -> tuple[list[Any], list[Any]]:
    """A daemon with the registry and `env` until its `predictions` and `dead_letters`
    are out (none: 3 s more to see none come): the output and dead-letter records."""
    settings = daemon_env(kafka.bootstrap, names, model, LSTMD_SCHEMA_REGISTRY_URL=registry.url, **env)
    daemon = DaemonProcess(settings)
    try:
        out = consume(kafka.bootstrap, names["out"], at_least=predictions, settle=1.0, while_running=daemon)
        dead = consume(
            kafka.bootstrap,
            names["dlq"],
            at_least=max(1, dead_letters),
            timeout=30.0 if dead_letters else 3.0,
        )
    finally:
        assert daemon.stop() == 0, "\n".join(daemon.lines[-30:])
    return out, dead


def as_json(records: list[Any], decode: Any, topic: str) -> list[Any]:
    """Output records with their values decoded (by Confluent's deserializer) back to
    JSON, for the checks the JSON tests use."""
    ctx = SerializationContext(topic, MessageField.VALUE)
    out = []
    for rec in records:
        value = decode(rec.value, ctx)
        out.append(SimpleNamespace(key=rec.key, value=orjson.dumps(value)))
    return out


def test_avro_in_and_out_against_the_oracle_with_a_new_version_mid_stream(
    kafka: LocalKafka, topics: Any, registry: StandInRegistry, model: Path
) -> None:
    names = topics({"in": 3, "out": 2, "dlq": 1})
    stream = interleaved_stream(n_keys=12, n_events=400, features=3, seed=71)
    sr = SchemaRegistryClient({"url": registry.url})
    ctx = SerializationContext(names["in"], MessageField.VALUE)
    v1, v2 = (AvroSerializer(sr, orjson.dumps(s).decode()) for s in (READING, READING_V2))
    half = len(stream.events) // 2
    values = [
        v1(full(v, READING), ctx) if i < half else v2(full(v, READING_V2) | {"site": "b"}, ctx)
        for i, (_, v) in enumerate(stream.events)
    ]
    ids = {framing.schema_id(v or b"") for v in values}
    assert len(ids) == 2  # two versions of the subject on the topic
    bad = [("bad-id", framing.frame(9999, (values[0] or b"")[5:])), ("bad-json", b'{"x": [1, 2, 3]}')]
    placed = produce_with(
        kafka.bootstrap, names["in"], [(k, v or b"") for (k, _), v in zip(stream.events, values, strict=True)]
    )
    produce_with(kafka.bootstrap, names["in"], bad)
    outputs, dead = serve(
        kafka, names, model, registry, len(stream.predicted_events), len(bad),
        LSTMD_ENGINE="fast", LSTMD_INPUT_FORMAT="avro", LSTMD_OUTPUT_FORMAT="avro",
    )  # fmt: skip
    assert all(framing.schema_id(r.value) == framing.schema_id(outputs[0].value) for r in outputs)
    check_predictions(model, stream, placed, as_json(outputs, AvroDeserializer(sr), names["out"]))
    assert [(r.key, r.value) for r in dead] == [(k.encode(), v) for k, v in bad]
    reasons = [dict(r.headers)["lstmd.error.class"] for r in dead]
    assert reasons == [b"unknown_schema", b"not_wire_format"]
    # The output's schema is registered under the topic's value subject (TopicNameStrategy).
    assert f"{names['out']}-value" in registry.store.subjects


def test_json_schema_in_and_out_against_the_oracle(
    kafka: LocalKafka, topics: Any, registry: StandInRegistry, model: Path
) -> None:
    names = topics({"in": 2, "out": 1, "dlq": 1})
    stream = interleaved_stream(n_keys=6, n_events=150, features=3, seed=72)
    sr = SchemaRegistryClient({"url": registry.url})
    ctx = SerializationContext(names["in"], MessageField.VALUE)
    serialize = JSONSerializer(orjson.dumps(READING_JSON).decode(), sr)
    placed = produce_with(
        kafka.bootstrap, names["in"], [(k, serialize(v, ctx) or b"") for k, v in stream.events]
    )
    outputs, dead = serve(
        kafka, names, model, registry, len(stream.predicted_events),
        LSTMD_INPUT_FORMAT="json-schema", LSTMD_OUTPUT_FORMAT="json-schema",
    )  # fmt: skip
    assert dead == []
    out_schema = registry.store.schemas[registry.store.subjects[f"{names['out']}-value"][0]][1]
    check_predictions(model, stream, placed, as_json(outputs, JSONDeserializer(out_schema), names["out"]))


def test_a_registry_outage_dead_letters_nothing_and_everything_is_answered_after_it(
    kafka: LocalKafka, topics: Any, registry: StandInRegistry, model: Path
) -> None:
    """The daemon has read version 1; version 2 is registered, the registry goes away,
    and records of version 2 arrive: they wait (readiness says why), nothing is
    dead-lettered, and every one is answered once the registry is back."""
    names = topics({"in": 2, "out": 1, "dlq": 1})
    stream = interleaved_stream(n_keys=6, n_events=200, features=3, seed=73)
    sr = SchemaRegistryClient({"url": registry.url})
    ctx = SerializationContext(names["in"], MessageField.VALUE)
    v1, v2 = (AvroSerializer(sr, orjson.dumps(s).decode()) for s in (READING, READING_V2))
    half = len(stream.events) // 2
    first = [(k, v1(full(v, READING), ctx) or b"") for k, v in stream.events[:half]]
    second = [(k, v2(full(v, READING_V2), ctx) or b"") for k, v in stream.events[half:]]
    env = daemon_env(
        kafka.bootstrap,
        names,
        model,
        LSTMD_INPUT_FORMAT="avro",
        LSTMD_SCHEMA_REGISTRY_URL=registry.url,
    )
    daemon = DaemonProcess(env)
    try:
        port = int(daemon.wait_for("http_listening")["port"])
        placed = produce_with(kafka.bootstrap, names["in"], first)
        before = sum(1 for i in stream.predicted_events if i < half)
        consume(kafka.bootstrap, names["out"], at_least=before, while_running=daemon)
        registry.stop()
        placed += produce_with(kafka.bootstrap, names["in"], second)
        daemon.wait_for("schema_registry_unreachable")
        status, why = scrape(port, "/readyz")
        assert status == 503 and "schema registry" in why, why
        registry.start()
        outputs = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            settle=1.0,
            while_running=daemon,
        )
        assert scrape(port, "/readyz")[0] == 200
    finally:
        assert daemon.stop() == 0, "\n".join(daemon.lines[-30:])
    check_predictions(model, stream, placed, outputs)
    # Waited for (at_least=1 never comes): with 0 the first empty poll would end the wait.
    assert consume(kafka.bootstrap, names["dlq"], at_least=1, timeout=3.0) == []
