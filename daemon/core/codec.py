"""The wire format: input records to events, predictions to output records.

Pure bytes-and-Python: nothing here knows TensorFlow or Kafka clients, so the
decoder can be fuzzed on its own. A record that cannot be applied raises
`RecordRejected` with a stable `reason` label; nothing else escapes `decode`.

Two halves, so every value format shares one meaning of the fields: a `Wire`
turns a value's bytes into an object and an output's fields into bytes (JSON
here; Avro and JSON Schema with a registry in daemon/schemas), and `decode`
checks the object's fields, found where `Fields` says, the same way for all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from daemon.errors import RecordRejected
from daemon.ops.metrics import DeadLetterReason

# The largest finite float32: the model's input type.
FLOAT32_MAX = 3.4028234663852886e38
# A dead letter copies its record's value up to this size (or LSTMD_MAX_RECORD_BYTES
# if larger): Kafka's default message size limit. Beyond it the value is left out,
# its size in a header, so one oversized record cannot block the dead-letter topic.
DEAD_LETTER_VALUE_BYTES = 1 << 20
# A rejected value is quoted in the reason up to this many characters.
SHOWN_CHARS = 80
# The reason header is cut here: a dead letter must fit the topic next to its value.
REASON_CHARS = 1000
# Reasons are metric label values and DLQ header values, declared in daemon/ops/metrics.py.
MISSING_KEY: DeadLetterReason = "missing_key"
BAD_KEY: DeadLetterReason = "bad_key"
TOO_LARGE: DeadLetterReason = "too_large"
BAD_JSON: DeadLetterReason = "bad_json"
NOT_OBJECT: DeadLetterReason = "not_object"
MISSING_X: DeadLetterReason = "missing_x"
BAD_X: DeadLetterReason = "bad_x"
WRONG_WIDTH: DeadLetterReason = "wrong_width"
NONFINITE: DeadLetterReason = "nonfinite"
BAD_FIELD: DeadLetterReason = "bad_field"
NONFINITE_OUTPUT: DeadLetterReason = "nonfinite_output"

# Python's json.dumps writes these non-standard literals for non-finite floats;
# orjson refuses them as syntax, but the operator needs to hear "non-finite".
_NONFINITE_LITERALS = (b"NaN", b"Infinity")


#: A value's bytes to the object its format carries (raises RecordRejected).
Parse = Callable[[bytes], Any]
#: An output's fields to the value's bytes.
Serialize = Callable[[dict[str, Any]], bytes]


def parse_json(value: bytes) -> Any:
    """The JSON wire format's value: UTF-8 JSON."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        if any(lit in value for lit in _NONFINITE_LITERALS):
            raise RecordRejected(NONFINITE, f"value holds a non-finite number: {exc}") from None
        raise RecordRejected(BAD_JSON, f"value is not UTF-8 JSON: {exc}") from None


@dataclass(slots=True, frozen=True)
class Fields:
    """Where an input record's fields are (LSTMD_INPUT_*_FIELD): shops name them their
    own way, and a typed record (Avro) often carries features as separate fields."""

    x: str = "x"
    #: Numeric fields that make `x`, in order; empty: `x` is one array field.
    x_fields: tuple[str, ...] = ()
    end: str = "end"
    start: str = "start"
    step: str = "step"
    ts: str = "ts"


@dataclass(slots=True, frozen=True)
class Wire:
    """How record values are read and written: the JSON wire format by default."""

    parse: Parse = parse_json
    serialize: Serialize = orjson.dumps
    fields: Fields = field(default_factory=Fields)
    #: The input format's name, as the dead letters' reasons say it.
    name: str = "JSON"


JSON_WIRE = Wire()


@dataclass(slots=True, frozen=True)
class Event:
    """One decoded input record. `x` is None for a pure end (reset) marker."""

    key: str
    x: tuple[float, ...] | None
    end: bool
    start: bool
    step: int | None
    ts: float | None


def decode(
    key: bytes | None, value: bytes | None, n_features: int, max_bytes: int, wire: Wire = JSON_WIRE
) -> Event:
    """Validate one record against the wire format, or raise RecordRejected."""
    if key is None:
        raise RecordRejected(MISSING_KEY, "record has no key (the sequence id)")
    try:
        seq = key.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordRejected(BAD_KEY, "key is not valid UTF-8") from None
    if not seq:
        raise RecordRejected(MISSING_KEY, "key is empty")
    if value is None:
        raise RecordRejected(NOT_OBJECT, "record has no value (tombstone)")
    if len(key) + len(value) > max_bytes:
        raise RecordRejected(TOO_LARGE, f"record is {len(key) + len(value)} bytes, limit {max_bytes}")
    obj = wire.parse(value)
    if not isinstance(obj, dict):
        raise RecordRejected(NOT_OBJECT, f"value is a {wire.name} {type(obj).__name__}, not an object")
    f = wire.fields
    end = _flag(obj, f.end)
    start = _flag(obj, f.start)
    step = obj.get(f.step)
    if step is not None and (type(step) is not int or step < 0):
        raise RecordRejected(BAD_FIELD, f"{f.step} must be a non-negative integer, got {_shown(step)}")
    ts = obj.get(f.ts)
    if isinstance(ts, datetime):  # a typed format's timestamp (Avro timestamp-millis)
        ts = ts.timestamp()
    if ts is not None and (type(ts) not in (int, float) or not math.isfinite(ts)):
        raise RecordRejected(BAD_FIELD, f"{f.ts} must be a number of seconds, got {_shown(ts)}")
    raw_x = obj.get(f.x) if not f.x_fields else _gathered(obj, f.x_fields)
    if raw_x is None:
        if not end:
            raise RecordRejected(MISSING_X, f"no {f.x}: only an end marker may omit it")
        return Event(seq, None, end, start, step, ts)
    return Event(seq, _features(raw_x, n_features, f), end, start, step, ts)


def _gathered(obj: dict[str, Any], names: tuple[str, ...]) -> list[Any] | None:
    """x from separate numeric fields: None if all are absent (an end marker), a
    refusal naming the first missing if only some are."""
    values = [obj.get(name) for name in names]
    if all(v is None for v in values):
        return None
    for name, v in zip(names, values, strict=True):
        if v is None:
            raise RecordRejected(MISSING_X, f"no {name}: x is made of {', '.join(names)}")
    return values


def _flag(obj: dict[str, Any], name: str) -> bool:
    value = obj.get(name)
    if value is None:  # absent or null, like the optional `step`, `ts` and `x`
        return False
    if type(value) is not bool:
        raise RecordRejected(BAD_FIELD, f"{name} must be true or false, got {_shown(value)}")
    return value


def _features(raw: Any, n_features: int, f: Fields) -> tuple[float, ...]:
    if not isinstance(raw, list):
        raise RecordRejected(BAD_X, f"{f.x} must be a list of numbers, got {type(raw).__name__}")
    if len(raw) != n_features:
        named = f"{len(raw)} fields" if f.x_fields else f"{f.x} has {len(raw)} values"
        raise RecordRejected(WRONG_WIDTH, f"{named}, the model takes {n_features}")
    values = []
    for v in raw:  # one pass: this runs for every event
        t = type(v)
        if t is not float and t is not int:  # bool is an int subclass: refused here on purpose
            raise RecordRejected(BAD_X, f"x holds a non-number: {_shown(v)}")
        # False for NaN and the infinities too: one comparison for every refusal below.
        if not -FLOAT32_MAX <= v <= FLOAT32_MAX:
            if t is float and not math.isfinite(v):
                raise RecordRejected(NONFINITE, "x holds a non-finite number")
            # The model computes in float32: such a number would reach it as infinity.
            raise RecordRejected(NONFINITE, "x holds a number beyond float32's range (3.4e38)")
        values.append(float(v))
    return tuple(values)


def _shown(value: Any) -> str:
    """A bad value as the reason quotes it: bounded, since the reason travels in a
    dead letter's header next to the whole original value."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def encode_prediction(
    *,
    seq: str,
    y: list[float],
    n: int,
    end: bool,
    partition: int,
    offset: int,
    model: str,
    ts: float,
    step: int | None = None,
    serialize: Serialize = orjson.dumps,
) -> bytes:
    """An output record value; see the README's wire format section."""
    out: dict[str, Any] = {
        "seq": seq,
        "y": y,
        "n": n,
        "end": end,
        "partition": partition,
        "offset": offset,
        "model": model,
        "ts": ts,
    }
    if step is not None:
        out["step"] = step
    return serialize(out)


def encode_eviction(
    *,
    seq: str,
    cause: str,
    n: int,
    partition: int,
    offset: int,
    model: str,
    ts: float,
    serialize: Serialize = orjson.dumps,
) -> bytes:
    """An output record announcing that a sequence's state was dropped before its end:
    its next input starts from a zero state. Tells consumers apart by `evicted`."""
    return serialize(
        {
            "seq": seq,
            "evicted": True,
            "cause": cause,
            "n": n,
            "partition": partition,
            "offset": offset,
            "model": model,
            "ts": ts,
        }
    )


def dlq_headers(error: RecordRejected, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """Headers that let an operator find and replay a dead-lettered record."""
    return [
        ("lstmd.error.class", error.reason.encode()),
        ("lstmd.error.reason", error.detail[:REASON_CHARS].encode()),
        ("lstmd.source.topic", topic.encode()),
        ("lstmd.source.partition", str(partition).encode()),
        ("lstmd.source.offset", str(offset).encode()),
    ]


# A dead letter's own headers (codec.dlq_headers and these) start with this; an input's
# headers of that name are not copied to its dead letter.
HEADER_PREFIX = "lstmd."
# Its value was left out, too large to copy: the value's size in bytes.
VALUE_OMITTED = "lstmd.value.omitted"
# Its key (and the input's headers) too, too large even without the value: their sizes.
KEY_OMITTED = "lstmd.key.omitted"
HEADERS_OMITTED = "lstmd.headers.omitted"
# The input's value was null and its key null: the dead letter's value is b"" in its place.
VALUE_NULL = "lstmd.value.null"
