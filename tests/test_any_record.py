"""Whatever a producer can write is answered or dead-lettered, and every answer can be
sent: record shapes (null, empty, not UTF-8, huge keys, values and headers, header
values that are null) through the processor and the checkpointer's send path, with a
producer that refuses what kafka-python's refuses. And an error the client raises
for one record's send is that record's failure, never an exception out of the loop.

The same against the real broker, written by librdkafka: tests/test_foreign_producers.py.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from kafka.errors import MessageSizeTooLargeError
from kafka.future import Future
from kafka.record.default_records import DefaultRecordBatchBuilder

from daemon.core import codec
from daemon.core.records import Kind, OutputRecord
from daemon.kafka.clients import max_message_bytes
from daemon.ops.metrics import DEAD_LETTER_REASONS, Metrics
from daemon.replay import FileRecord
from daemon.streaming.delivery import SendRefused, TransactionFailed, make_delivery
from daemon.streaming.policy import Checkpoint
from tests.fakes import TP, FakeConsumer, FakeProducer, make, output, settings

LIMIT = codec.DEAD_LETTER_VALUE_BYTES  # LSTMD_MAX_RECORD_BYTES's default is the same 1 MiB
HUGE = b"h" * (LIMIT + 10)


class KafkaLikeProducer(FakeProducer):
    """Refuses a send as kafka-python 3.0.12's KafkaProducer.send does (its checks,
    in its order), and acknowledges the rest."""

    def __init__(self, max_request_size: int, *, refuse_keys: bool = False) -> None:
        super().__init__()
        self.max_request_size = max_request_size
        self.refuse_keys = refuse_keys  # as a client with a bug would, for any record with a key
        self.records: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    def send(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Any = None,
        **_: Any,
    ) -> Future:
        if value is None and key is None:
            raise ValueError("Need at least one: key or value")
        if key is not None and self.refuse_keys:
            raise TypeError("this client refuses every key")
        headers = [] if headers is None else headers
        if not isinstance(headers, list):
            raise TypeError("headers must be list-type")
        if not all(
            isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], bytes)
            for h in headers
        ):
            raise TypeError("All headers items must be (str, bytes) tuples")
        for part in (key, value):
            if part is not None and not isinstance(part, bytes):
                raise TypeError(f"Unsupported type for serialized key or value: {type(part)}")
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)  # type: ignore[no-untyped-call]
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        self.records.append((topic, key, value, list(headers)))
        return super().send(topic, key, value)


# -- record shapes ------------------------------------------------------------------

VALID_KEYS = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).map(str.encode)
KEYS = st.one_of(
    st.none(),
    st.just(b""),
    VALID_KEYS,
    st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"ok\x80"]),  # not UTF-8
    st.just(HUGE),
)
EVENTS = st.floats(-1e3, 1e3).map(lambda v: orjson.dumps({"x": [v]}))
VALUES = st.one_of(
    st.none(),
    st.just(b""),
    EVENTS,
    st.binary(max_size=12),  # mostly not JSON, sometimes not UTF-8
    st.sampled_from([b"\xff\xfe{", b'{"x": [NaN]}', b"[1]", b'{"x": [1, 2]}', b'{"y": 1}']),
    st.just(HUGE),
)
HEADER_VALUES = st.one_of(st.none(), st.binary(max_size=6), st.just(b"\xff\xfe"), st.just(HUGE))
HEADERS = st.lists(
    st.tuples(st.one_of(st.text(max_size=6), st.sampled_from(["lstmd.error.class", "trace"])), HEADER_VALUES),
    max_size=3,
)


@st.composite
def batches(draw: st.DrawFn) -> list[FileRecord]:
    shapes = draw(st.lists(st.tuples(KEYS, VALUES, HEADERS), min_size=1, max_size=6))
    return [
        FileRecord("in", 0, offset, 0, key, value, tuple(headers))
        for offset, (key, value, headers) in enumerate(shapes)
    ]


def answerable(rec: FileRecord) -> bool:
    """What the wire format accepts of these shapes: a non-empty UTF-8 key and a
    {"x": [one finite number]} value, key and value within the size limit."""
    key, value = rec.key, rec.value
    if not key or value is None or len(key) + len(value) > LIMIT:
        return False
    try:
        key.decode()
        obj = orjson.loads(value)
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        return False
    x = obj.get("x") if isinstance(obj, dict) else None
    return isinstance(x, list) and len(x) == 1 and type(x[0]) in (int, float)


def check_dead_letter(letter: OutputRecord, rec: FileRecord) -> None:
    """A dead letter carries its input unchanged, or says exactly what it left out."""
    headers = dict(letter.headers)
    assert headers["lstmd.source.offset"] == str(rec.offset).encode()
    assert headers["lstmd.error.class"].decode() in DEAD_LETTER_REASONS
    carried = [(n, v if v is not None else b"") for n, v in rec.headers if not n.startswith("lstmd.")]
    if codec.KEY_OMITTED in headers:  # bare: the daemon's headers alone
        assert letter.key is None and headers[codec.KEY_OMITTED] == str(len(rec.key or b"")).encode()
        assert headers[codec.HEADERS_OMITTED] == str(len(carried)).encode()
        assert all(n.startswith("lstmd.") for n, _ in letter.headers)
    else:
        assert letter.key == rec.key
        assert letter.headers[: len(carried)] == carried
        assert all(n.startswith("lstmd.") for n, _ in letter.headers[len(carried) :])
    if codec.VALUE_OMITTED in headers:
        assert headers[codec.VALUE_OMITTED] == str(len(rec.value or b"")).encode()
        assert letter.value == (b"" if letter.key is None else None)
    elif letter.key is None and rec.value is None:  # Kafka has no record without both
        assert letter.value == b"" and headers[codec.VALUE_NULL] == b"true"
    else:
        assert letter.value == rec.value and codec.VALUE_NULL not in headers


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
@hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=batches())
def test_every_record_is_answered_once_and_every_answer_is_sent(
    records: list[FileRecord], delivery: str, tmp_path: Path
) -> None:
    proc, _ = make()
    outputs = proc.process(records)
    assert [o.offset for o in outputs] == [r.offset for r in records]  # exactly one each, in order
    for out, rec in zip(outputs, records, strict=True):
        assert out.kind is (Kind.PREDICTION if answerable(rec) else Kind.DEAD_LETTER), rec
        if out.dead_letter:
            check_dead_letter(out, rec)
    s = settings(tmp_path, delivery=delivery)
    producer = KafkaLikeProducer(max_message_bytes(s))
    abandon = threading.Event()
    abandon.set()  # a failed send would raise at once (DeliveryFailed, TransactionFailed), not retry
    cp = make_delivery(s, cast(Any, lambda: producer), Metrics(), threading.Event(), abandon=abandon)
    assert cp.commit(FakeConsumer(), Checkpoint(outputs=outputs, offsets={TP: len(records)}))  # type: ignore[arg-type]
    assert [(t, k, v) for t, k, v, _ in producer.records] == [
        ("in.dlq" if o.dead_letter else "out", o.key, o.value) for o in outputs
    ]


def test_a_null_null_record_becomes_an_empty_valued_dead_letter(tmp_path: Path) -> None:
    """The README's example, exactly: offset 7, headers carried, the null marked."""
    proc, _ = make()
    rec = FileRecord("events", 2, 7, 0, None, None, (("trace", None), ("lstmd.error.class", b"old")))
    [letter] = proc.process([rec])
    assert (letter.kind, letter.key, letter.value) == (Kind.DEAD_LETTER, None, b"")
    assert letter.headers == [
        ("trace", b""),
        ("lstmd.error.class", b"missing_key"),
        ("lstmd.error.reason", b"record has no key (the sequence id)"),
        ("lstmd.source.topic", b"events"),
        ("lstmd.source.partition", b"2"),
        ("lstmd.source.offset", b"7"),
        ("lstmd.value.null", b"true"),
    ]


def test_a_huge_key_is_dead_lettered_bare(tmp_path: Path) -> None:
    proc, _ = make()
    [letter] = proc.process([FileRecord("in", 0, 0, 0, HUGE, HUGE, (("a", b"1"),))])
    headers = dict(letter.headers)
    assert (letter.key, letter.value) == (None, b"")
    assert headers[codec.KEY_OMITTED] == headers[codec.VALUE_OMITTED] == str(len(HUGE)).encode()
    assert headers[codec.HEADERS_OMITTED] == b"1" and headers["lstmd.error.class"] == b"too_large"


# -- one record's send error is that record's problem ----------------------------------


class RefusesOnce(FakeProducer):
    """kafka-python raises ValueError (not a KafkaError) for a partition its metadata
    does not know yet: the first send of the record with value b"2" meets it."""

    refused = 0

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, **kw: Any) -> Future:
        if value == b"2" and not RefusesOnce.refused:
            RefusesOnce.refused += 1
            raise ValueError(f"Unrecognized partition 5 for topic {topic}")
        return super().send(topic, key, value)


def test_a_non_kafka_error_from_send_is_that_records_failure(tmp_path: Path) -> None:
    RefusesOnce.refused = 0
    made: list[RefusesOnce] = []

    def producer() -> RefusesOnce:
        made.append(RefusesOnce())
        return made[-1]

    metrics = Metrics()
    cp = make_delivery(settings(tmp_path), cast(Any, producer), metrics, threading.Event())
    records = [output(b"a", b"1"), output(b"b", b"2"), output(b"c", b"3")]
    # Pipelined (between checkpoints): the send returns; the refused record fails alone.
    cp.send(records)
    assert cp.failing()
    assert [v for _, v in made[0].sent] == [b"1", b"3"]
    # The checkpoint resends it (on a new producer, after a backoff) and commits.
    assert cp.commit(FakeConsumer(), Checkpoint(offsets={TP: 3}))  # type: ignore[arg-type]
    assert [v for p in made for _, v in p.sent] == [b"1", b"3", b"2"]
    assert metrics.registry.get_sample_value("lstmd_produce_errors_total") == 1


def test_a_non_kafka_error_from_send_aborts_the_transaction(tmp_path: Path) -> None:
    RefusesOnce.refused = 0
    producer = RefusesOnce()
    cp = make_delivery(
        settings(tmp_path, delivery="exactly-once"), cast(Any, lambda: producer), Metrics(), threading.Event()
    )
    with pytest.raises(TransactionFailed) as caught:  # the run loop restores and recomputes
        cp.commit(FakeConsumer(), Checkpoint(outputs=[output(b"b", b"2")], offsets={TP: 1}))  # type: ignore[arg-type]
    assert isinstance(caught.value.__cause__, SendRefused) and "Unrecognized partition" in str(caught.value)
    assert producer.calls[-1] == "abort_transaction" and "commit_transaction" not in producer.calls


def test_a_dead_letter_the_client_refuses_is_sent_bare(tmp_path: Path) -> None:
    """Whatever the client refuses a dead letter for, a smaller one goes: the bare form
    (no key, b"" value, the daemon's headers) is always sendable."""

    s = settings(tmp_path)
    producer = KafkaLikeProducer(max_message_bytes(s), refuse_keys=True)
    proc, _ = make()
    [letter] = proc.process([FileRecord("in", 0, 0, 0, b"k", b"not json", (("a", b"1"),))])
    cp = make_delivery(s, cast(Any, lambda: producer), Metrics(), threading.Event())
    assert cp.commit(FakeConsumer(), Checkpoint(outputs=[letter], offsets={TP: 1}))  # type: ignore[arg-type]
    [(topic, key, value, headers)] = producer.records
    assert (topic, key, value) == ("in.dlq", None, b"")
    assert dict(headers)[codec.VALUE_OMITTED] == b"8" and dict(headers)[codec.KEY_OMITTED] == b"1"


def test_a_batch_the_broker_refuses_costs_its_dead_letters_their_values_not_keys(tmp_path: Path) -> None:
    """The broker refuses a whole batch for one large record: on the resend each dead
    letter of it goes without its value, and one already without keeps its key."""
    refusals: list[int] = []

    class RefusesFirstBatch(FakeProducer):
        def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, **kw: Any) -> Future:
            self.records.append((key, value, dict(kw.get("headers") or [])))
            if not refusals or len(refusals) < 2:
                refusals.append(1)
                return Future().failure(MessageSizeTooLargeError("batch over max.message.bytes"))
            return Future().success(None)

    RefusesFirstBatch.records = []  # type: ignore[attr-defined]
    proc, _ = make()
    letters = proc.process(
        [FileRecord("in", 0, 0, 0, b"a", HUGE), FileRecord("in", 0, 1, 0, b"b", b"x" * 3000)]
    )
    abandon = threading.Event()
    cp = make_delivery(
        settings(tmp_path), cast(Any, RefusesFirstBatch), Metrics(), threading.Event(), abandon=abandon
    )
    threading.Timer(10, abandon.set).start()  # never reached: one backoff, then the resend succeeds
    assert cp.commit(FakeConsumer(), Checkpoint(outputs=letters, offsets={TP: 2}))  # type: ignore[arg-type]
    sent = RefusesFirstBatch.records[-2:]  # type: ignore[attr-defined]
    assert [(k, v, h[codec.VALUE_OMITTED]) for k, v, h in sent] == [
        (b"a", None, str(len(HUGE)).encode()),
        (b"b", None, b"3000"),
    ]
