"""A registered schema as a reader of payloads, and the output's schemas.

Avro payloads are read with the writer's schema as the registry gives it (no
reader schema): every version of a subject decodes, and `codec.decode` then
finds the fields it needs, so a compatible evolution just works. JSON Schema
payloads are JSON, validated against their schema as Confluent's deserializers do.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import fastavro
import fastjsonschema
import jsonschema
import orjson

from daemon.errors import RecordRejected
from daemon.ops.metrics import DeadLetterReason
from daemon.schemas.registry import Schema

#: Dead-letter reasons of the registry formats (declared in daemon/ops/metrics.py).
NOT_WIRE_FORMAT: DeadLetterReason = "not_wire_format"
UNKNOWN_SCHEMA: DeadLetterReason = "unknown_schema"
BAD_PAYLOAD: DeadLetterReason = "bad_payload"

#: LSTMD_*_FORMAT to the registry's schema type.
SCHEMA_TYPES = {"avro": "AVRO", "json-schema": "JSON"}

Reader = Callable[[bytes], Any]
Writer = Callable[[dict[str, Any]], bytes]


def reader(schema: Schema, expected: str) -> Reader:
    """A payload reader for `schema`; a schema of another type than the input's
    format (`expected`, the registry's name) reads every payload as a refusal."""
    if schema.type != expected:
        detail = f"schema {schema.id} is of type {schema.type}, the input format takes {expected}"
        return _refusing(detail)
    if schema.references:
        return _refusing(f"schema {schema.id} has references to other schemas, which lstmd does not read")
    try:
        parsed = orjson.loads(schema.text)
    except orjson.JSONDecodeError as exc:
        return _refusing(f"schema {schema.id} is not JSON: {exc}")
    if expected == "AVRO":
        return _avro_reader(schema.id, parsed)
    return _json_reader(schema.id, parsed)


def _refusing(detail: str) -> Reader:
    def read(_payload: bytes) -> Any:
        raise RecordRejected(BAD_PAYLOAD, detail)

    return read


def _avro_reader(schema_id: int, parsed: Any) -> Reader:
    try:
        writer_schema = fastavro.parse_schema(parsed)
    except Exception as exc:  # fastavro raises several kinds for a bad schema
        return _refusing(f"schema {schema_id} is not a valid Avro schema: {exc}")

    def read(payload: bytes) -> Any:
        try:
            return fastavro.schemaless_reader(io.BytesIO(payload), writer_schema, None)
        except Exception as exc:  # truncated, bad varint, bad UTF-8, bad union index...
            detail = f"payload does not decode as Avro schema {schema_id}: {type(exc).__name__}: {exc}"
            raise RecordRejected(BAD_PAYLOAD, detail) from None

    return read


def _json_reader(schema_id: int, parsed: Any) -> Reader:
    """Validated with fastjsonschema (the schema compiled to Python: ~4 us a value where
    jsonschema takes ~50, measured by `lstmd bench --sections formats`), which knows
    drafts 4, 6 and 7; a schema of a later draft with jsonschema."""
    draft = str(parsed.get("$schema", "")) if isinstance(parsed, dict) else ""
    if "2019-09" in draft or "2020-12" in draft:
        return _json_reader_later_drafts(schema_id, parsed)
    try:
        validate = fastjsonschema.compile(parsed)
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        return _refusing(f"schema {schema_id} is not a valid JSON Schema: {exc}")

    def read(payload: bytes) -> Any:
        obj = _json(payload)
        try:
            validate(obj)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise RecordRejected(
                BAD_PAYLOAD, f"payload is not valid under JSON schema {schema_id}: {exc.message}"
            ) from None
        return obj

    return read


def _json_reader_later_drafts(schema_id: int, parsed: Any) -> Reader:
    try:
        cls = jsonschema.validators.validator_for(parsed)
        cls.check_schema(parsed)
        validator = cls(parsed)
    except jsonschema.SchemaError as exc:
        return _refusing(f"schema {schema_id} is not a valid JSON Schema: {exc.message}")

    def read(payload: bytes) -> Any:
        obj = _json(payload)
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the value"
            raise RecordRejected(
                BAD_PAYLOAD, f"payload is not valid under JSON schema {schema_id}: {where}: {error.message}"
            )
        return obj

    return read


def _json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise RecordRejected(BAD_PAYLOAD, f"payload is not JSON: {exc}") from None


# -- the output's schemas -------------------------------------------------------------
#: An output record (a prediction or an eviction notice) as Avro: the fields of the JSON
#: output; those only one kind has are nullable or defaulted, so one schema carries both.
OUTPUT_AVRO: dict[str, Any] = {
    "type": "record",
    "name": "Output",
    "namespace": "io.lstmd",
    "doc": "A prediction of lstmd (evicted false), or a notice that a sequence's state was dropped "
    "(evicted true, y null).",
    "fields": [
        {"name": "seq", "type": "string"},
        {"name": "y", "type": ["null", {"type": "array", "items": "double"}], "default": None},
        {"name": "n", "type": "long"},
        {"name": "end", "type": "boolean", "default": False},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "model", "type": "string"},
        {"name": "ts", "type": "double"},
        {"name": "step", "type": ["null", "long"], "default": None},
        {"name": "evicted", "type": "boolean", "default": False},
        {"name": "cause", "type": ["null", "string"], "default": None},
    ],
}

OUTPUT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "io.lstmd.Output",
    "description": OUTPUT_AVRO["doc"],
    "type": "object",
    "properties": {
        "seq": {"type": "string"},
        "y": {"type": "array", "items": {"type": "number"}},
        "n": {"type": "integer"},
        "end": {"type": "boolean"},
        "partition": {"type": "integer"},
        "offset": {"type": "integer"},
        "model": {"type": "string"},
        "ts": {"type": "number"},
        "step": {"type": "integer"},
        "evicted": {"type": "boolean"},
        "cause": {"type": "string"},
    },
    "required": ["seq", "n", "partition", "offset", "model", "ts"],
}

_DEFAULTS = {f["name"]: f.get("default") for f in OUTPUT_AVRO["fields"] if "default" in f}


def output_schema(fmt: str) -> tuple[str, str]:
    """(schema type, schema text) of the output in format `fmt` (LSTMD_OUTPUT_FORMAT)."""
    if fmt == "avro":
        return "AVRO", orjson.dumps(OUTPUT_AVRO).decode()
    return "JSON", orjson.dumps(OUTPUT_JSON_SCHEMA).decode()


def writer(fmt: str) -> Writer:
    """The payload writer of an output in format `fmt` (without the wire header)."""
    if fmt == "avro":
        parsed = fastavro.parse_schema(OUTPUT_AVRO)

        def write_avro(fields: dict[str, Any]) -> bytes:
            buffer = io.BytesIO()
            fastavro.schemaless_writer(buffer, parsed, _DEFAULTS | fields)
            return buffer.getvalue()

        return write_avro
    return orjson.dumps
