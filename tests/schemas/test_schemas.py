"""The registry formats, piece by piece, against a stand-in registry on a real port:
the wire header, the registry's answers told apart (outage, unknown id, refusal),
schemas fetched once per pod, payloads read with the writer's schema, the fields
found where the settings say, and the output written in its registered schema.

Payloads are written by Confluent's own serializers (confluent-kafka's
schema_registry), as producers in Kafka shops write them, not by lstmd's code."""

from __future__ import annotations

import io
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import orjson
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from daemon.core import codec
from daemon.devtools.localkafka import make_test_pki
from daemon.errors import RecordRejected
from daemon.replay import FileRecord as Rec
from daemon.schemas import formats, framing
from daemon.schemas.cache import SchemaCache
from daemon.schemas.registry import (
    Connection,
    RegistryClient,
    RegistryRefused,
    RegistryUnavailable,
    SchemaNotFound,
)
from daemon.schemas.wire import InputSchemas, OutputSchema
from tests.support.registry import StandInRegistry

READING: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "fields": [
        {"name": "x", "type": {"type": "array", "items": "float"}},
        {"name": "end", "type": ["null", "boolean"], "default": None},
    ],
}
# Version 2 of the subject: a field added with a default (a compatible evolution).
READING_V2: dict[str, Any] = {
    **READING,
    "fields": [*READING["fields"], {"name": "site", "type": "string", "default": "?"}],
}
READING_JSON: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"x": {"type": "array", "items": {"type": "number"}}, "end": {"type": "boolean"}},
    "required": ["x"],
}


@pytest.fixture
def registry() -> Any:
    with StandInRegistry() as r:
        yield r


def client(url: str, **kw: Any) -> RegistryClient:
    return RegistryClient(Connection(url, timeout_s=2.0, **kw))


def avro_value(
    registry: StandInRegistry, schema: dict[str, Any], obj: dict[str, Any], topic: str = "in"
) -> bytes:
    """A value as Confluent's AvroSerializer writes it (registering the schema)."""
    serializer = AvroSerializer(SchemaRegistryClient({"url": registry.url}), orjson.dumps(schema).decode())
    value: bytes | None = serializer(obj, SerializationContext(topic, MessageField.VALUE))
    assert value is not None
    return value


def json_value(registry: StandInRegistry, obj: dict[str, Any], topic: str = "in") -> bytes:
    serializer = JSONSerializer(
        orjson.dumps(READING_JSON).decode(), SchemaRegistryClient({"url": registry.url})
    )
    value: bytes | None = serializer(obj, SerializationContext(topic, MessageField.VALUE))
    assert value is not None
    return value


def decoded(
    schemas: InputSchemas, value: bytes, fields: codec.Fields | None = None, n: int = 3
) -> codec.Event:
    wire = codec.Wire(parse=schemas.parse, fields=fields or codec.Fields(), name="avro")
    schemas.resolve([Rec("in", 0, 0, 0, b"k", value)])
    return codec.decode(b"k", value, n, 1 << 20, wire)


def refusal(schemas: InputSchemas, value: bytes) -> RecordRejected:
    with pytest.raises(RecordRejected) as caught:
        decoded(schemas, value)
    return caught.value


# -- the wire header ---------------------------------------------------------------------
def test_the_header_is_magic_zero_then_a_big_endian_id() -> None:
    assert framing.frame(258, b"p") == b"\x00\x00\x00\x01\x02p"
    assert framing.schema_id(b"\x00\x00\x00\x01\x02p") == 258
    assert framing.schema_id(b'{"x": [1]}') is None  # JSON: not the wire format
    assert framing.schema_id(b"\x00\x00\x00\x01") is None  # too short for an id


# -- the registry's answers ----------------------------------------------------------------
def test_the_registry_answers_are_told_apart(registry: StandInRegistry) -> None:
    sid = registry.register("in-value", "AVRO", READING)
    c = client(registry.url)
    got = c.schema(sid)
    assert (got.id, got.type, orjson.loads(got.text)) == (sid, "AVRO", READING)
    with pytest.raises(SchemaNotFound):
        c.schema(999)
    with pytest.raises(RegistryRefused, match="LSTMD_SCHEMA_REGISTRY_URL: no Schema Registry API"):
        client(registry.url + "/not-here").schema(sid)
    registry.stop()
    with pytest.raises(RegistryUnavailable):
        c.schema(sid)


def test_wrong_credentials_are_a_refusal_naming_the_variables() -> None:
    with StandInRegistry(username="lstmd", password="right") as r:
        sid = r.register("in-value", "AVRO", READING)
        assert client(r.url, username="lstmd", password="right").schema(sid).id == sid
        with pytest.raises(RegistryRefused, match="LSTMD_SCHEMA_REGISTRY_USERNAME") as caught:
            client(r.url, username="lstmd", password="wrong").schema(sid)
        assert "wrong" not in str(caught.value)  # secrets never appear


def test_an_https_registry_with_mutual_tls(tmp_path: Path) -> None:
    """LSTMD_SCHEMA_REGISTRY_CAFILE, _CERTFILE and _KEYFILE: a trusted registry that asks
    for our certificate; an untrusted one, or one that refuses ours, is a refusal
    naming the variable (not an outage retried forever)."""
    pki = make_test_pki(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki.directory / "server.crt", pki.directory / "server.key")
    server.load_verify_locations(pki.ca_cert)
    server.verify_mode = ssl.CERT_REQUIRED
    with StandInRegistry(tls=server) as r:
        sid = r.register("in-value", "AVRO", READING)
        ok = client(r.url, cafile=pki.ca_cert, certfile=pki.client_cert, keyfile=pki.client_key)
        assert ok.schema(sid).id == sid
        with pytest.raises(RegistryRefused, match="LSTMD_SCHEMA_REGISTRY_CAFILE"):
            client(r.url, certfile=pki.client_cert, keyfile=pki.client_key).schema(sid)
        with pytest.raises(RegistryRefused, match="LSTMD_SCHEMA_REGISTRY_CERTFILE"):
            client(r.url, cafile=pki.ca_cert).schema(sid)


def test_a_registry_that_is_slow_to_answer_is_an_outage() -> None:
    """A listening socket that never answers: the call gives up at its timeout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(RegistryUnavailable):
            RegistryClient(Connection(url, timeout_s=0.3)).schema(1)


def test_the_output_schema_is_registered_or_found(registry: StandInRegistry) -> None:
    out = OutputSchema(client(registry.url), "avro", "predictions")
    first = out.register()
    assert registry.store.subjects == {"predictions-value": [first]}
    again = OutputSchema(client(registry.url), "avro", "predictions")
    assert again.register() == first  # found by lookup, not registered twice
    assert registry.calls["POST /subjects/predictions-value/versions"] == 1
    registry.store.refuse.add("p2-value")
    with pytest.raises(RegistryRefused, match="incompatible"):
        OutputSchema(client(registry.url), "avro", "p2").register()


# -- once per pod --------------------------------------------------------------------------
def test_workers_sharing_a_directory_fetch_each_schema_once(
    registry: StandInRegistry, tmp_path: Path
) -> None:
    sid = registry.register("in-value", "AVRO", READING)
    caches = [SchemaCache(client(registry.url), tmp_path) for _ in range(4)]
    threads = [threading.Thread(target=c.fetch, args=(sid,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.calls[f"GET /schemas/ids/{sid}"] == 1
    assert all(c.get(sid) is not None and c.get(sid) == caches[0].get(sid) for c in caches)


def test_an_unknown_id_is_asked_again_only_after_a_while(registry: StandInRegistry) -> None:
    now = [0.0]
    cache = SchemaCache(client(registry.url), clock=lambda: now[0])
    assert cache.fetch(7) is None and cache.fetch(7) is None
    assert registry.calls["GET /schemas/ids/7"] == 1
    registry.register("in-value", "AVRO", READING)  # id 1
    now[0] = 61.0
    assert cache.fetch(7) is None
    assert registry.calls["GET /schemas/ids/7"] == 2


# -- reading input -------------------------------------------------------------------------
def test_avro_from_confluents_serializer_decodes_to_the_event(registry: StandInRegistry) -> None:
    schemas = InputSchemas(SchemaCache(client(registry.url)), "avro")
    ev = decoded(schemas, avro_value(registry, READING, {"x": [0.5, 1.5, -2.0], "end": True}))
    assert (ev.key, ev.x, ev.end, ev.start) == ("k", (0.5, 1.5, -2.0), True, False)


def test_a_new_compatible_version_mid_stream_decodes_too(registry: StandInRegistry) -> None:
    schemas = InputSchemas(SchemaCache(client(registry.url)), "avro")
    v1 = avro_value(registry, READING, {"x": [1.0, 2.0, 3.0], "end": None})
    v2 = avro_value(registry, READING_V2, {"x": [4.0, 5.0, 6.0], "end": None, "site": "b"})
    assert framing.schema_id(v1) != framing.schema_id(v2)
    assert decoded(schemas, v1).x == (1.0, 2.0, 3.0)
    assert decoded(schemas, v2).x == (4.0, 5.0, 6.0)


def test_features_as_separate_fields_and_a_timestamp_field(registry: StandInRegistry) -> None:
    """x from numeric fields named by LSTMD_INPUT_X_FIELDS, `ts` from an Avro
    timestamp-millis field named by LSTMD_INPUT_TS_FIELD, the end flag renamed."""
    schema = {
        "type": "record",
        "name": "Telemetry",
        "fields": [
            {"name": "temp", "type": "double"},
            {"name": "rpm", "type": "long"},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "last", "type": "boolean"},
        ],
    }
    at = datetime(2026, 12, 6, 12, 0, 1, 500_000, tzinfo=UTC)
    value = avro_value(registry, schema, {"temp": 21.5, "rpm": 900, "at": at, "last": False})
    fields = codec.Fields(x_fields=("temp", "rpm"), ts="at", end="last")
    ev = decoded(InputSchemas(SchemaCache(client(registry.url)), "avro"), value, fields, n=2)
    assert (ev.x, ev.ts, ev.end) == ((21.5, 900.0), at.timestamp(), False)


def test_json_schema_values_are_validated_against_their_schema(registry: StandInRegistry) -> None:
    schemas = InputSchemas(SchemaCache(client(registry.url)), "json-schema")
    assert decoded(schemas, json_value(registry, {"x": [1, 2, 3]})).x == (1.0, 2.0, 3.0)
    sid = framing.schema_id(json_value(registry, {"x": [1, 2, 3]}))
    assert sid is not None
    bad = framing.frame(sid, orjson.dumps({"x": "warm"}))  # written by a careless producer
    rejected = refusal(schemas, bad)
    assert rejected.reason == formats.BAD_PAYLOAD and "data.x must be array" in rejected.detail
    later = {**READING_JSON, "$schema": "https://json-schema.org/draft/2020-12/schema"}
    later_id = registry.register("later-value", "JSON", later)
    rejected = refusal(schemas, framing.frame(later_id, orjson.dumps({"x": "warm"})))
    assert rejected.reason == formats.BAD_PAYLOAD and "x: 'warm' is not of type 'array'" in rejected.detail
    assert decoded(schemas, framing.frame(later_id, orjson.dumps({"x": [1, 2, 3]}))).x == (1.0, 2.0, 3.0)


def test_each_bad_record_gets_its_own_reason(registry: StandInRegistry) -> None:
    schemas = InputSchemas(SchemaCache(client(registry.url)), "avro")
    good = avro_value(registry, READING, {"x": [1.0, 2.0, 3.0], "end": None})
    sid = framing.schema_id(good)
    assert sid is not None
    assert refusal(schemas, b'{"x": [1, 2, 3]}').reason == formats.NOT_WIRE_FORMAT
    assert refusal(schemas, framing.frame(4242, good[5:])).reason == formats.UNKNOWN_SCHEMA
    assert refusal(schemas, framing.frame(sid, b"\x07")).reason == formats.BAD_PAYLOAD  # truncated
    json_id = registry.register("other-value", "JSON", READING_JSON)
    wrong = refusal(schemas, framing.frame(json_id, b'{"x": [1, 2, 3]}'))
    assert wrong.reason == formats.BAD_PAYLOAD and "type JSON" in wrong.detail


def test_an_outage_raises_before_anything_is_decoded(registry: StandInRegistry) -> None:
    """`resolve` is the only call that reaches the registry: it raises, so the run loop
    holds the batch back; nothing becomes a dead letter."""
    schemas = InputSchemas(SchemaCache(client(registry.url)), "avro")
    value = avro_value(registry, READING, {"x": [1.0, 2.0, 3.0], "end": None})
    registry.stop()
    with pytest.raises(RegistryUnavailable):
        schemas.resolve([Rec("in", 0, 0, 0, b"k", value)])
    with pytest.raises(LookupError):  # decoding an unresolved id is a bug, never a dead letter
        schemas.parse(value)


# -- writing output ------------------------------------------------------------------------
def test_predictions_and_notices_are_written_in_the_registered_avro_schema(registry: StandInRegistry) -> None:
    out = OutputSchema(client(registry.url), "avro", "predictions")
    sid = out.register()
    value = codec.encode_prediction(
        seq="k", y=[0.25], n=3, end=False, partition=1, offset=9, model="m@1", ts=5.5, serialize=out.serialize
    )
    notice = codec.encode_eviction(
        seq="k", cause="idle", n=3, partition=1, offset=9, model="m@1", ts=6.0, serialize=out.serialize
    )
    schema = fastavro.parse_schema(orjson.loads(registry.store.schemas[sid][1]))
    read: list[Any] = [fastavro.schemaless_reader(io.BytesIO(v[5:]), schema, None) for v in (value, notice)]
    assert [framing.schema_id(v) for v in (value, notice)] == [sid, sid]
    assert read[0] == {
        "seq": "k", "y": [0.25], "n": 3, "end": False, "partition": 1, "offset": 9, "model": "m@1",
        "ts": 5.5, "step": None, "evicted": False, "cause": None,
    }  # fmt: skip
    assert (read[1]["evicted"], read[1]["cause"], read[1]["y"]) == (True, "idle", None)


def test_json_schema_output_is_json_after_the_header(registry: StandInRegistry) -> None:
    out = OutputSchema(client(registry.url), "json-schema", "predictions")
    sid = out.register()
    value = codec.encode_prediction(
        seq="k", y=[1.0], n=1, end=True, partition=0, offset=0, model="m", ts=1.0, serialize=out.serialize
    )
    assert framing.schema_id(value) == sid
    assert orjson.loads(value[5:])["y"] == [1.0]
    assert registry.store.schemas[sid][0] == "JSON"
