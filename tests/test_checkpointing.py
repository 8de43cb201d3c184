"""Checkpoints when Kafka misbehaves: a rebalance under a commit, a producer that
cannot be built, an expelled member's transaction. Unit tests with fake clients;
the same paths run against the real broker in tests/test_faults.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.errors import (
    CommitFailedError,
    FencedInstanceIdError,
    KafkaTimeoutError,
    ProducerFencedError,
    RebalanceInProgressError,
    TopicAuthorizationFailedError,
)
from kafka.future import Future
from kafka.structs import ConsumerGroupMetadata

from daemon.config import Settings
from daemon.core.processor import OutputRecord
from daemon.core.state import SequenceState
from daemon.errors import KafkaSetupError
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery import (
    Checkpoint,
    Checkpointer,
    StateRecord,
    TransactionFailed,
)
from daemon.streaming.restore import Restorer
from tests.test_processor import recs
from tests.test_restore_policy import loop, settings

TP = TopicPartition("in", 0)


def checkpointer(s: Settings, make: Callable[[], object]) -> Checkpointer:
    return Checkpointer(s, cast(Callable[[], KafkaProducer], make), Metrics(), threading.Event())


class FakeProducer:
    def __init__(self, abort_error: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes | None]] = []
        self.calls: list[str] = []
        self.abort_error = abort_error

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             **_: Any) -> Future:
        self.sent.append((topic, value))
        return Future().success(None)

    def flush(self, timeout: float | None = None) -> None:
        self.calls.append("flush")

    def close(self, timeout: float | None = None) -> None:
        self.calls.append("close")

    def __getattr__(self, name: str) -> Any:  # the transactional calls, recorded
        def call(*_: Any) -> None:
            self.calls.append(name)
            if name == "abort_transaction" and self.abort_error is not None:
                raise self.abort_error
        return call


class FakeConsumer:
    def __init__(self, commit_error: Exception | None = None, generation: int = 3) -> None:
        self.commit_error = commit_error
        self.commits = 0
        self.generation = generation

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits += 1
        if self.commit_error is not None:
            raise self.commit_error

    def group_metadata(self) -> ConsumerGroupMetadata:
        return ConsumerGroupMetadata("g", self.generation, "member-1", None)


def output() -> OutputRecord:
    return OutputRecord(key=b"k", value=b"{}", dead_letter=False, source_timestamp_ms=0)


@pytest.mark.parametrize("error", [RebalanceInProgressError(), CommitFailedError()])
def test_a_commit_during_a_rebalance_is_deferred_not_retried(tmp_path: Path,
                                                             error: Exception) -> None:
    cp = checkpointer(settings(tmp_path), FakeProducer)
    consumer = FakeConsumer(commit_error=error)
    started = time.monotonic()
    committed = cp.commit(consumer, Checkpoint(outputs=[output()], offsets={TP: 5}))  # type: ignore[arg-type]
    # Only poll() completes a rebalance: a retry loop here would never end.
    assert committed is False
    assert consumer.commits == 1 and time.monotonic() - started < 1.0


def test_a_fenced_static_member_names_its_instance_id(tmp_path: Path) -> None:
    cp = checkpointer(settings(tmp_path, group_instance_id="lstmd-0"), FakeProducer)
    with pytest.raises(KafkaSetupError, match=r"lstmd-0.*LSTMD_GROUP_INSTANCE_ID"):
        cp.commit(FakeConsumer(commit_error=FencedInstanceIdError()),  # type: ignore[arg-type]
                  Checkpoint(offsets={TP: 5}))


def test_a_producer_is_awaited_while_the_cluster_does_not_answer(tmp_path: Path) -> None:
    attempts: list[int] = []

    def make() -> FakeProducer:
        attempts.append(1)
        if len(attempts) < 3:
            raise KafkaTimeoutError("Unable to bootstrap")
        return FakeProducer()

    cp = checkpointer(settings(tmp_path), make)
    assert isinstance(cast(object, cp.producer), FakeProducer) and len(attempts) == 3


def test_an_expelled_member_commits_no_transaction(tmp_path: Path) -> None:
    producer = FakeProducer()
    cp = checkpointer(settings(tmp_path, delivery="exactly-once"), lambda: producer)
    with pytest.raises(TransactionFailed):
        cp.commit(FakeConsumer(generation=-1),  # type: ignore[arg-type]
                  Checkpoint(outputs=[output()], offsets={TP: 5}))
    assert "send_offsets_to_transaction" not in producer.calls
    assert "commit_transaction" not in producer.calls
    assert producer.calls[-1] == "abort_transaction"


def test_a_fenced_producer_is_replaced_after_the_abort_fails(tmp_path: Path) -> None:
    made: list[FakeProducer] = []

    def make() -> FakeProducer:
        made.append(FakeProducer(abort_error=ProducerFencedError() if not made else None))
        return made[-1]

    cp = checkpointer(settings(tmp_path, delivery="exactly-once"), make)
    made[0].send = lambda *a, **k: Future().failure(KafkaTimeoutError())  # type: ignore[method-assign]
    with pytest.raises(TransactionFailed):
        cp.commit(FakeConsumer(), Checkpoint(outputs=[output()], offsets={TP: 5}))  # type: ignore[arg-type]
    assert cast(object, cp.producer) is made[1] and "close" in made[0].calls
    assert made[1].calls == ["init_transactions"]


class RecordingCheckpointer:
    """Stands in for Checkpointer in RunLoop._checkpoint."""

    transactional = False

    def __init__(self, committed: bool = True) -> None:
        self.checkpoints: list[Checkpoint] = []
        self.committed = committed

    def commit(self, consumer: object, cp: Checkpoint) -> bool:
        self.checkpoints.append(cp)
        return self.committed


def test_offsets_of_a_deferred_commit_are_kept_for_the_next(tmp_path: Path) -> None:
    rl = loop(tmp_path)
    cp = RecordingCheckpointer(committed=False)
    rl._checkpoint(None, cp, None, recs([("a", {"x": [1]})]), force=True)  # type: ignore[arg-type]
    assert rl._uncommitted == {TP: 1}
    cp.committed = True
    rl._checkpoint(None, cp, None, recs([("b", {"x": [1]})], start=1), force=True)  # type: ignore[arg-type]
    assert cp.checkpoints[-1].offsets == {TP: 2} and rl._uncommitted == {}


def test_an_eviction_is_checkpointed_at_once(tmp_path: Path) -> None:
    rl = loop(tmp_path, max_sequences=1)
    cp = RecordingCheckpointer()
    rl._checkpoint(None, cp, None, recs([("a", {"x": [1]})]), force=True)  # type: ignore[arg-type]
    rl._checkpoint(None, cp, None, recs([("b", {"x": [1]})], start=1))  # type: ignore[arg-type]
    last = cp.checkpoints[-1]
    assert [o.announcement for o in last.outputs] == [False, True]
    # Not only the notice: the reset record and the offsets, within the interval.
    assert [(s.key, s.value is not None) for s in last.states if s.key == "a"] == [("a", True)]
    assert SequenceState.restore(next(s.value for s in last.states if s.key == "a") or b"")[0].n == 0
    assert last.offsets == {TP: 2}


def test_after_a_restore_the_oldest_watermark_is_evicted_first(tmp_path: Path) -> None:
    rl = loop(tmp_path, max_sequences=2)
    one = np.array([1.0], np.float32)
    restored = {key: (SequenceState(tensors=[one], n=1, watermark=wm), "new@1")
                for key, wm in (("late", 9), ("early", 3))}
    rl._install(0, restored)
    out = rl.processor.process(recs([("new", {"x": [1]})], start=10))
    assert [o.key for o in out if o.announcement] == [b"early"]



def test_an_expelled_member_writes_no_state_records(tmp_path: Path) -> None:
    producer = FakeProducer()
    cp = checkpointer(settings(tmp_path), lambda: producer)
    state = StateRecord(0, "a", b"state")
    with pytest.raises(TransactionFailed):  # the run loop restores, as after an abort
        cp.commit(FakeConsumer(generation=-1),  # type: ignore[arg-type]
                  Checkpoint(outputs=[output()], states=[state], offsets={TP: 5}))
    # The outputs are out (a restart repeats them identically); no state record is.
    assert [topic for topic, _ in producer.sent] == ["out"]


class FakeStateConsumer:
    """A state partition holding `records`, read in one poll."""

    def __init__(self, records: list[tuple[bytes, bytes | None]], fail_ends: int = 0) -> None:
        self.records = records
        self.fail_ends = fail_ends
        self.read = False

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self.fail_ends:
            self.fail_ends -= 1
            raise KafkaTimeoutError("no leader")
        return dict.fromkeys(tps, len(self.records))

    def assign(self, tps: list[TopicPartition]) -> None: ...

    def seek_to_beginning(self, *tps: TopicPartition) -> None: ...

    def position(self, tp: TopicPartition) -> int:
        return len(self.records) if self.read else 0

    def poll(self, timeout_ms: int = 0, max_records: int = 0) -> dict[TopicPartition, list[Any]]:
        self.read = True
        return {TopicPartition("state", 0): [
            type("Rec", (), {"key": k, "value": v, "offset": i})()
            for i, (k, v) in enumerate(self.records)]}


def restore(consumer: FakeStateConsumer) -> dict[str, tuple[SequenceState, str]]:
    restorer = Restorer(cast(Any, consumer), "state", Metrics())
    restorer.begin([0])
    for _ in range(5):
        done = restorer.step()
        if done:
            return done[0]
    raise AssertionError("the restore never finished")


def test_an_unreadable_state_record_starts_the_sequence_over() -> None:
    good = SequenceState(tensors=[np.array([1.0], np.float32)], n=1, watermark=4).snapshot("m@1")
    states = restore(FakeStateConsumer([(b"a", good), (b"b", good), (b"a", b"not a state")]))
    # "a" must not fall back to its older record: that state is behind its inputs.
    assert sorted(states) == ["b"]


def test_a_restore_waits_for_the_state_partition_end() -> None:
    good = SequenceState(tensors=[np.array([1.0], np.float32)], n=1, watermark=4).snapshot("m@1")
    states = restore(FakeStateConsumer([(b"a", good)], fail_ends=2))
    assert states["a"][0].watermark == 4


class RefusedStateConsumer(FakeStateConsumer):
    def poll(self, timeout_ms: int = 0, max_records: int = 0) -> dict[TopicPartition, list[Any]]:
        raise TopicAuthorizationFailedError()


def test_read_on_the_state_topic_revoked_ends_the_daemon_naming_it(tmp_path: Path) -> None:
    rl = loop(tmp_path)
    restorer = Restorer(cast(Any, RefusedStateConsumer([(b"a", None)])), "g.state", Metrics())
    rl._start_restore(restorer, {TP})
    with pytest.raises(KafkaSetupError, match=r"g\.state.*LSTMD_STATE_TOPIC"):
        rl._restore(restorer)
