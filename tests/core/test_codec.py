"""The wire format decoder: valid events or typed rejections, nothing else."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core import codec
from daemon.errors import RecordRejected
from daemon.ops.metrics import DEAD_LETTER_REASONS

F = 3
LIMIT = 1 << 20


def decode(value: object, key: bytes | None = b"s1") -> codec.Event:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return codec.decode(key, raw, F, LIMIT)


def reason(value: object, key: bytes | None = b"s1") -> str:
    with pytest.raises(RecordRejected) as caught:
        decode(value, key)
    return caught.value.reason


def test_valid_event() -> None:
    ev = decode({"x": [1, 2.5, -3], "end": True, "step": 4, "ts": 1.5, "extra": "ok"})
    assert ev == codec.Event("s1", (1.0, 2.5, -3.0), True, False, 4, 1.5)


def test_null_flags_are_absent() -> None:
    event = decode({"x": [1, 2, 3], "end": None, "start": None, "step": None, "ts": None})
    assert (event.end, event.start, event.step, event.ts) == (False, False, None, None)


def test_pure_end_marker() -> None:
    assert decode({"end": True}).x is None


@pytest.mark.parametrize(
    ("value", "key", "expected"),
    [
        ({"x": [1, 2, 3]}, None, codec.MISSING_KEY),
        ({"x": [1, 2, 3]}, b"", codec.MISSING_KEY),
        ({"x": [1, 2, 3]}, b"\xff\xfe", codec.BAD_KEY),
        (b'{"x": [1, 2', b"k", codec.BAD_JSON),
        (b"\xff", b"k", codec.BAD_JSON),
        ([1, 2, 3], b"k", codec.NOT_OBJECT),
        ({"start": True}, b"k", codec.MISSING_X),
        ({"x": "1,2,3"}, b"k", codec.BAD_X),
        ({"x": [1, "2", 3]}, b"k", codec.BAD_X),
        ({"x": [1, True, 3]}, b"k", codec.BAD_X),
        ({"x": [1, 2]}, b"k", codec.WRONG_WIDTH),
        (b'{"x": [1, NaN, 3]}', b"k", codec.NONFINITE),
        # Finite in JSON, infinite as the float32 the model computes in.
        (b'{"x": [1, 1e39, 3]}', b"k", codec.NONFINITE),
        (b'{"x": [1, -1000000000000000000000000000000000000000, 3]}', b"k", codec.NONFINITE),
        (b'{"x": [1, 1e400, 3]}', b"k", codec.BAD_JSON),
        ({"x": [1, 2, 3], "end": "yes"}, b"k", codec.BAD_FIELD),
        ({"x": [1, 2, 3], "step": -1}, b"k", codec.BAD_FIELD),
        ({"x": [1, 2, 3], "step": 1.5}, b"k", codec.BAD_FIELD),
        ({"x": [1, 2, 3], "ts": "now"}, b"k", codec.BAD_FIELD),
    ],
)
def test_rejections(value: object, key: bytes | None, expected: str) -> None:
    assert reason(value, key) == expected


def test_float32_extremes_are_accepted() -> None:
    assert decode({"x": [3.4028234e38, -3.4028234e38, 1e-45]}).x is not None


def test_a_reason_quotes_a_bad_value_briefly() -> None:
    """The reason travels in a header next to the whole value: it must not double it."""
    with pytest.raises(RecordRejected) as caught:
        codec.decode(b"k", orjson.dumps({"x": [1, 2, 3], "step": "a" * 500_000}), F, 1 << 20)
    assert caught.value.reason == codec.BAD_FIELD and len(caught.value.detail) < 200


def test_size_limit() -> None:
    with pytest.raises(RecordRejected) as caught:
        codec.decode(b"k", b'{"x": [1, 2, 3]}' + b" " * 100, F, 64)
    assert caught.value.reason == codec.TOO_LARGE


def test_prediction_round_trip() -> None:
    raw = codec.encode_prediction(
        seq="a", y=[0.5], n=2, end=False, partition=1, offset=9, model="m@abc", ts=12.0, step=3
    )
    assert orjson.loads(raw) == {
        "seq": "a",
        "y": [0.5],
        "n": 2,
        "end": False,
        "partition": 1,
        "offset": 9,
        "model": "m@abc",
        "ts": 12.0,
        "step": 3,
    }


@settings(max_examples=400, deadline=None)
@given(key=st.one_of(st.none(), st.binary(max_size=8)), value=st.one_of(st.none(), st.binary()))
def test_any_bytes_give_an_event_or_a_rejection(key: bytes | None, value: bytes | None) -> None:
    try:
        ev = codec.decode(key, value, F, LIMIT)
    except RecordRejected as exc:
        assert exc.reason in DEAD_LETTER_REASONS
    else:
        assert ev.x is None or len(ev.x) == F


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    obj=st.fixed_dictionaries(
        {},
        optional={
            "x": json_values | st.lists(st.floats(allow_nan=False), min_size=F, max_size=F),
            "end": json_values,
            "start": json_values,
            "step": json_values,
            "ts": json_values,
        },
    )
)
def test_any_json_object_gives_an_event_or_a_rejection(obj: dict[str, object]) -> None:
    try:
        ev = codec.decode(b"k", orjson.dumps(obj), F, LIMIT)
    except RecordRejected as exc:
        assert exc.reason in DEAD_LETTER_REASONS
    else:
        assert ev.x is None or len(ev.x) == F
