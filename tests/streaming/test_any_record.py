"""Whatever a producer can write is answered or dead-lettered, and every answer can be
sent: record shapes (null, empty, not UTF-8, huge keys, values and headers, header
values that are null) through the processor and the checkpointer's send path, on the
in-memory Kafka, whose producer refuses what kafka-python's refuses. And an error the client raises
for one record's send is that record's failure, never an exception out of the loop.

The same against the real broker, written by librdkafka: tests/broker/test_foreign_producers.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, MessageSizeTooLargeError

from daemon.core import codec
from daemon.core.records import Kind, OutputRecord
from daemon.ops.metrics import DEAD_LETTER_REASONS, Metrics
from daemon.replay import FileRecord
from daemon.streaming.delivery import SendRefused, TransactionFailed
from daemon.streaming.policy import Checkpoint
from tests.support.backends import memory_delivery, memory_kafka, memory_member
from tests.support.fakes import TP, make, output, settings
from tests.support.kafka import MemoryKafka

LIMIT = codec.DEAD_LETTER_VALUE_BYTES  # LSTMD_MAX_RECORD_BYTES's default is the same 1 MiB
HUGE = b"h" * (LIMIT + 10)


def sent_in_order(kafka: MemoryKafka, *topics: str) -> list[ConsumerRecord]:
    """The records that landed on `topics`, in the order they were appended."""
    return sorted((r for t in topics for r in kafka.records(t)), key=lambda r: r.timestamp)


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
    kafka = memory_kafka(s)
    abandon = threading.Event()
    abandon.set()  # a failed send would raise at once (DeliveryFailed, TransactionFailed), not retry
    cp = memory_delivery(kafka, s, abandon=abandon)
    consumer = memory_member(kafka, s)
    assert cp.commit(consumer, Checkpoint(outputs=outputs, offsets={TP: len(records)}))
    assert [(r.topic, r.key, r.value) for r in sent_in_order(kafka, s.output_topic, s.dlq_topic)] == [
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


def refuses_once(topic: str, key: bytes | None, value: bytes | None) -> Exception | None:
    """kafka-python raises ValueError (not a KafkaError) for a partition its metadata
    does not know yet: the first send of the record with value b"2" meets it."""
    if value == b"2" and not REFUSED:
        REFUSED.append(value)
        return ValueError(f"Unrecognized partition 5 for topic {topic}")
    return None


REFUSED: list[bytes] = []


def test_a_non_kafka_error_from_send_is_that_records_failure(tmp_path: Path) -> None:
    REFUSED.clear()
    s = settings(tmp_path)
    kafka = memory_kafka(s)
    kafka.refuse_sends = refuses_once
    metrics = Metrics()
    cp = memory_delivery(kafka, s, metrics)
    records = [output(b"a", b"1"), output(b"b", b"2"), output(b"c", b"3")]
    # Pipelined (between checkpoints): the send returns; the refused record fails alone.
    cp.send(records)
    assert cp.failing()
    assert [v for _, v in kafka.producers[0].sent] == [b"1", b"3"]
    # The checkpoint resends it (on a new producer, after a backoff) and commits.
    assert cp.commit(memory_member(kafka, s), Checkpoint(offsets={TP: 3}))
    assert [v for p in kafka.producers for _, v in p.sent] == [b"1", b"3", b"2"]
    assert kafka.values(s.output_topic) == [b"1", b"3", b"2"]
    assert metrics.registry.get_sample_value("lstmd_produce_errors_total") == 1


def test_a_non_kafka_error_from_send_aborts_the_transaction(tmp_path: Path) -> None:
    REFUSED.clear()
    s = settings(tmp_path, delivery="exactly-once")
    kafka = memory_kafka(s)
    kafka.refuse_sends = refuses_once
    cp = memory_delivery(kafka, s)
    [producer] = kafka.producers
    consumer = memory_member(kafka, s)
    with pytest.raises(TransactionFailed) as caught:  # the run loop restores and recomputes
        cp.commit(consumer, Checkpoint(outputs=[output(b"b", b"2")], offsets={TP: 1}))
    assert isinstance(caught.value.__cause__, SendRefused) and "Unrecognized partition" in str(caught.value)
    assert producer.calls[-1] == "abort_transaction" and "commit_transaction" not in producer.calls


def test_a_dead_letter_the_client_refuses_is_sent_bare(tmp_path: Path) -> None:
    """Whatever the client refuses a dead letter for, a smaller one goes: the bare form
    (no key, b"" value, the daemon's headers) is always sendable."""

    s = settings(tmp_path)
    kafka = memory_kafka(s)
    # As a client with a bug would, for any record with a key.
    kafka.refuse_sends = lambda topic, key, value: TypeError("this client refuses every key") if key else None
    proc, _ = make()
    [letter] = proc.process([FileRecord("in", 0, 0, 0, b"k", b"not json", (("a", b"1"),))])
    cp = memory_delivery(kafka, s)
    assert cp.commit(memory_member(kafka, s), Checkpoint(outputs=[letter], offsets={TP: 1}))
    [record] = sent_in_order(kafka, s.output_topic, s.dlq_topic)
    assert (record.topic, record.key, record.value) == ("in.dlq", None, b"")
    headers = dict(record.headers)
    assert headers[codec.VALUE_OMITTED] == b"8" and headers[codec.KEY_OMITTED] == b"1"


def test_a_batch_the_broker_refuses_costs_its_dead_letters_their_values_not_keys(tmp_path: Path) -> None:
    """The broker refuses a whole batch for one large record: on the resend each dead
    letter of it goes without its value, and one already without keeps its key."""
    refusals: list[bytes | None] = []

    def refuses_first_batch(topic: str, key: bytes | None, value: bytes | None) -> KafkaError | None:
        if len(refusals) < 2:
            refusals.append(key)
            return MessageSizeTooLargeError("batch over max.message.bytes")
        return None

    s = settings(tmp_path)
    kafka = memory_kafka(s)
    kafka.fail_sends = refuses_first_batch
    proc, _ = make()
    letters = proc.process(
        [FileRecord("in", 0, 0, 0, b"a", HUGE), FileRecord("in", 0, 1, 0, b"b", b"x" * 3000)]
    )
    abandon = threading.Event()
    cp = memory_delivery(kafka, s, abandon=abandon)
    threading.Timer(10, abandon.set).start()  # never reached: one backoff, then the resend succeeds
    assert cp.commit(memory_member(kafka, s), Checkpoint(outputs=letters, offsets={TP: 2}))
    sent = [(r.key, r.value, dict(r.headers)[codec.VALUE_OMITTED]) for r in kafka.records(s.dlq_topic)]
    assert refusals == [b"a", b"b"] and sent == [
        (b"a", None, str(len(HUGE)).encode()),
        (b"b", None, b"3000"),
    ]
