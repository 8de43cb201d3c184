"""At-least-once, pipelined: outputs are sent without waiting, and a checkpoint
acknowledges what it covers before it writes states and commits offsets.

The in-memory Kafka's broker answers a send only when its producer flushes
(`ack_on_flush`, as the broker would, later), and its journal shows the order of
events; the real-broker crash tests (tests/broker/test_faults.py) show nothing is lost with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka.errors import KafkaError, KafkaTimeoutError

from daemon.core.records import Kind, OutputRecord, StateRecord
from daemon.kafka.port import GroupConsumer
from daemon.kafka.retry import Backoff
from daemon.ops.metrics import Metrics
from daemon.streaming import housekeeping
from daemon.streaming.delivery import CheckpointAbandoned, Delivery, at_least_once
from daemon.streaming.loop import RunLoop
from daemon.streaming.policy import Checkpoint
from tests.support.backends import Memory, memory_delivery, memory_kafka, ported, unported
from tests.support.fakes import TP, make, settings
from tests.support.kafka import MemoryKafka


def out(value: bytes, key: bytes = b"k", partition: int = 0, ts_ms: int = 0) -> OutputRecord:
    return OutputRecord(
        Kind.PREDICTION, key=key, value=value, partition=partition, offset=0, source_timestamp_ms=ts_ms
    )


def pipeline(
    tmp_path: Path,
    fail: Callable[[bytes | None, bytes | None], bool] = lambda key, value: False,
    partitions: int = 1,
) -> tuple[Delivery, MemoryKafka, Metrics]:
    """At-least-once delivery on an in-memory Kafka that acknowledges a send when its
    producer flushes; `fail(key, value)` decides which the broker loses."""
    s = settings(tmp_path)
    kafka = memory_kafka(s, partitions)
    kafka.ack_on_flush = True

    def lost(topic: str, key: bytes | None, value: bytes | None) -> KafkaError | None:
        return KafkaTimeoutError("lost") if fail(key, value) else None

    kafka.fail_sends = lost
    metrics = Metrics()
    return memory_delivery(kafka, s, metrics), kafka, metrics


def member(kafka: MemoryKafka) -> GroupConsumer:
    """The only member of group "g" on "in" (the settings' group and input topic)."""
    return ported(kafka.member("in"))


def test_outputs_are_sent_without_waiting_and_acknowledged_before_states_and_offsets(tmp_path: Path) -> None:
    cp, kafka, metrics = pipeline(tmp_path)
    log = kafka.journal
    cp.send([out(b"1")])
    cp.send([out(b"2")])
    assert log == ["send out b'1'", "send out b'2'"]  # no flush between poll batches
    state = StateRecord(0, "k", b"s")
    assert cp.commit(member(kafka), Checkpoint(outputs=[out(b"3")], states=[state], offsets={TP: 3}))
    assert log[2:] == [
        "send out b'3'",
        "flush",  # the checkpoint waits for every output it covers...
        "ack out b'1'",
        "ack out b'2'",
        "ack out b'3'",
        "send g.state b's'",  # ...then the states...
        "flush",
        "ack g.state b's'",
        "commit",  # ...then the offsets
    ]
    assert metrics.registry.get_sample_value("lstmd_predictions_produced_total") == 3


def test_a_failed_output_is_resent_with_the_later_outputs_of_its_key_before_the_commit(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(at_least_once, "Backoff", _NoWait)
    lost_once: set[bytes] = set()

    def fail(key: bytes | None, value: bytes | None) -> bool:
        if value == b"a1" and value not in lost_once:
            lost_once.add(value)
            return True
        return False

    cp, kafka, metrics = pipeline(tmp_path, fail=fail)
    cp.send([out(b"a1", b"a"), out(b"b1", b"b"), out(b"a2", b"a")])
    kafka.acknowledge()  # the broker answers between two poll batches
    assert cp.failing()  # the loop then takes a checkpoint at once
    assert cp.commit(member(kafka), Checkpoint(offsets={TP: 3}))
    log = kafka.journal
    acked = [entry.split()[-1] for entry in log if entry.startswith("ack")]
    # a2 was acknowledged before a1 was lost: it goes again after a1; b is not repeated.
    assert acked == ["b'b1'", "b'a2'", "b'a1'", "b'a2'"]
    assert log[-1] == "commit" and not cp.failing()
    # Three predictions: a2's repeat is not counted again (nor its latency observed twice).
    assert metrics.registry.get_sample_value("lstmd_predictions_produced_total") == 3
    assert metrics.registry.get_sample_value("lstmd_end_to_end_latency_seconds_count") == 3


def test_outputs_in_flight_are_bounded(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(at_least_once, "MAX_IN_FLIGHT_BYTES", 10)
    cp, kafka, _ = pipeline(tmp_path)
    cp.send([out(b"123456")])
    assert not cp.backlogged()
    cp.send([out(b"123456")])
    assert cp.backlogged()  # 12 bytes unacknowledged
    kafka.acknowledge()
    assert not cp.backlogged()


def test_a_revoked_partitions_failed_outputs_are_not_resent(tmp_path: Path) -> None:
    cp, kafka, _ = pipeline(tmp_path, fail=lambda key, value: value == b"p1")
    cp.send([out(b"p1", b"one", partition=1), out(b"p0", b"zero", partition=0)])
    kafka.acknowledge()
    assert cp.failing()
    cp.release(1)  # its next owner recomputes p1 from the last commit
    assert not cp.failing()
    assert cp.commit(member(kafka), Checkpoint(offsets={TP: 1}))
    assert [e for e in kafka.journal if e.startswith("send")] == ["send out b'p1'", "send out b'p0'"]


def test_an_expelled_member_resends_no_output(tmp_path: Path, monkeypatch: Any) -> None:
    """Outputs are fenced like states: a failed prediction resent by a member the group
    expelled could land after its partition's next owner published the key's newer one."""
    monkeypatch.setattr(at_least_once, "Backoff", _NoWait)
    lost = iter([True])  # the broker loses the first send only
    cp, kafka, _ = pipeline(tmp_path, fail=lambda key, value: next(lost, False))
    expelled = member(kafka)
    cp.send([out(b"old")])
    kafka.acknowledge()  # lost; meanwhile the group expelled this member
    unported(expelled).expel()
    with pytest.raises(CheckpointAbandoned):  # the run loop restores, as after an abort
        cp.commit(expelled, Checkpoint(offsets={TP: 1}))
    assert [e for e in kafka.journal if e.startswith("send")] == ["send out b'old'"]
    assert "commit" not in kafka.journal


def test_a_member_expelled_during_the_retries_stops_resending(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(at_least_once, "Backoff", _NoWait)
    losses: list[bytes | None] = []
    consumer: list[GroupConsumer] = []

    def fail(key: bytes | None, value: bytes | None) -> bool:
        """The broker loses the first five sends; the group expels the member while
        the third is in flight (it was a member for the first resend only)."""
        losses.append(value)
        if len(losses) == 3:
            unported(consumer[0]).expel()
        return len(losses) <= 5

    cp, kafka, _ = pipeline(tmp_path, fail=fail)
    consumer.append(member(kafka))
    cp.send([out(b"old")])
    with pytest.raises(CheckpointAbandoned):
        cp.commit(consumer[0], Checkpoint(offsets={TP: 1}))
    assert [e for e in kafka.journal if e.startswith("send")] == ["send out b'old'"] * 3
    assert "commit" not in kafka.journal


def test_latency_and_count_are_taken_at_the_acknowledgement(tmp_path: Path) -> None:
    cp, kafka, metrics = pipeline(tmp_path)
    latency = "lstmd_end_to_end_latency_seconds_sum"
    cp.send([out(b"1", ts_ms=1)])
    assert metrics.registry.get_sample_value(latency) == 0  # sent, not acknowledged
    kafka.acknowledge()
    assert (metrics.registry.get_sample_value(latency) or 0) > 1e9  # seconds since the record's timestamp
    assert (
        metrics.registry.get_sample_value("lstmd_predictions_produced_total") == 1
    )  # counted at the acknowledgement, not later


def test_outputs_go_to_their_input_partition_when_the_topics_are_aligned(tmp_path: Path) -> None:
    cp, kafka, _ = pipeline(tmp_path, partitions=4)
    cp.send([out(b"1", partition=2)])  # by key: murmur2(b"k") puts it in partition 0 of 4
    cp.same_partitions = True
    cp.send([out(b"2", partition=2)])
    kafka.acknowledge()
    assert [(r.value, r.partition) for r in kafka.records("out")] == [(b"1", 0), (b"2", 2)]


class _NoWait(Backoff):
    def wait(self) -> bool:  # retry at once
        return False


def backlogged_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, partitions: int = 1
) -> tuple[Memory, RunLoop, Metrics]:
    """A run loop on the in-memory Kafka whose outputs are not acknowledged (held),
    with a bound of one byte in flight: its first outputs make it backlogged."""
    monkeypatch.setattr(at_least_once, "MAX_IN_FLIGHT_BYTES", 1)
    monkeypatch.setattr(housekeeping, "HOUSEKEEPING_INTERVAL_S", 0.0)
    kafka = Memory()
    kafka.kafka.hold_acks = True
    s = kafka.settings(tmp_path, partitions=partitions, checkpoint_interval_ms=60_000)
    proc, metrics = make()
    return kafka, kafka.loop(s, proc, metrics), metrics


def consumed(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("lstmd_events_consumed_total")


def test_the_loop_pauses_its_partitions_while_outputs_are_backlogged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paused, the loop still polls (heartbeats, rebalances, SIGTERM) instead of
    blocking in `send`; it resumes once the acknowledgements caught up."""
    kafka, rl, metrics = backlogged_loop(tmp_path, monkeypatch)
    one = orjson.dumps({"x": [1]})
    kafka.produce("in", [(b"a", one, 0), (b"b", one, 0)])
    kafka.run_until([rl], lambda: consumed(metrics) == 2)
    consumer = unported(rl.clients.consumer)
    kafka.produce("in", [(b"c", one, 0)])
    for _ in range(3):
        rl.step()
    assert consumer.paused() == {TP} and consumed(metrics) == 2  # polled, nothing taken
    assert kafka.kafka.unacknowledged == 2
    assert metrics.registry.get_sample_value("lstmd_backpressure_pauses_total") == 1  # once per episode
    kafka.kafka.acknowledge()
    kafka.run_until([rl], lambda: consumed(metrics) == 3)
    assert consumer.paused() == set()


def test_the_lag_of_paused_partitions_stays_current(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paused (backpressure), a partition is not fetched, so its last fetch's high
    watermark freezes while producers write on: its end is asked of the broker
    instead, once per housekeeping, with a bound."""
    kafka, rl, metrics = backlogged_loop(tmp_path, monkeypatch, partitions=2)
    one = orjson.dumps({"x": [1]})
    kafka.produce("in", [(b"a", one, 0), (b"b", one, 1)])
    kafka.run_until([rl], lambda: consumed(metrics) == 2)
    rl.step()  # paused from here on
    kafka.produce("in", [(b"a", one, 0)] * 40)
    rl.step()
    lag = metrics.registry.get_sample_value
    assert lag("lstmd_consumer_lag", {"partition": "0"}) == 40
    assert lag("lstmd_consumer_lag", {"partition": "1"}) == 0
    kafka.kafka.acknowledge()
    kafka.run_until([rl], lambda: consumed(metrics) == 42)
    rl.step()
    assert lag("lstmd_consumer_lag", {"partition": "0"}) == 0
