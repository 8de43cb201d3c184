"""The one rule both delivery pipelines resend by (daemon/streaming/delivery/order.py):
from a key's first failed record on, every later record of that key, in each topic,
goes again; nothing else does."""

from __future__ import annotations

from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from daemon.core.records import Kind, OutputRecord, StateRecord
from daemon.streaming.delivery.order import KeyOrder, Sent, in_key_order


def out(key: bytes, value: bytes, *, dead_letter: bool = False, partition: int = 0) -> OutputRecord:
    kind = Kind.DEAD_LETTER if dead_letter else Kind.PREDICTION
    return OutputRecord(kind, key=key, value=value, partition=partition, offset=0, source_timestamp_ms=0)


def ok() -> Future:
    return Future().success(None)


def lost() -> Future:
    return Future().failure(KafkaTimeoutError("lost"))


def test_a_failure_sends_its_key_again_in_its_topic_only() -> None:
    sent: Sent = [
        (out(b"a", b"1"), ok()),  # before the failure: not again
        (out(b"a", b"2"), lost()),
        (out(b"b", b"1"), ok()),  # another key
        (out(b"a", b"x", dead_letter=True), ok()),  # the same key in another topic
        (StateRecord(0, "a", b"s"), ok()),
        (out(b"a", b"3"), ok()),  # acknowledged after a's failure: again, after it
    ]
    again = in_key_order(sent)
    assert [(i.key, i.value) for i in again] == [(b"a", b"2"), (b"a", b"3")]


def test_a_released_partition_leaves_no_key_broken() -> None:
    order = KeyOrder()
    order.judge(out(b"a", b"1", partition=1), lost())
    order.judge(out(b"b", b"1"), lost())
    order.release(1)  # revoked: a's next owner publishes a
    order.judge(out(b"a", b"2", partition=1), ok())
    order.judge(out(b"b", b"2"), ok())
    assert [(i.key, i.value) for i, _ in order.clear()] == [(b"b", b"1"), (b"b", b"2")]
    assert order.resend == [] and order.broken == set()
