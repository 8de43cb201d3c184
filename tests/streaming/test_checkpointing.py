"""Checkpoints when Kafka misbehaves: a rebalance under a commit, a producer that
cannot be built, an expelled member's transaction. Unit tests on the in-memory Kafka
(tests/support/kafka.py); the same paths run against the real broker in
tests/broker/test_faults.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kafka.errors import (
    CommitFailedError,
    FencedInstanceIdError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    RebalanceInProgressError,
    TopicAuthorizationFailedError,
)

from daemon.config import Settings
from daemon.core.records import StateRecord
from daemon.core.state import UNREADABLE, SavedState, SequenceState
from daemon.errors import KafkaSetupError
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery import DeliveryFailed, TransactionFailed
from daemon.streaming.policy import Checkpoint
from daemon.streaming.restore import Restorer, adopt
from tests.support.backends import (
    memory_delivery,
    memory_kafka,
    memory_member,
    ported,
    unported,
    unported_producer,
)
from tests.support.fakes import TP, make, output, outputs, recs, settings
from tests.support.kafka import MemoryKafka


@pytest.mark.parametrize("error", [RebalanceInProgressError(), CommitFailedError()])
def test_a_commit_during_a_rebalance_is_deferred_not_retried(tmp_path: Path, error: KafkaError) -> None:
    s = settings(tmp_path)
    kafka = memory_kafka(s)
    cp = memory_delivery(kafka, s)
    consumer = memory_member(kafka, s)
    kafka.faults.commit.append(error)
    started = time.monotonic()
    committed = cp.commit(consumer, Checkpoint(outputs=[output()], offsets={TP: 5}))
    # Only poll() completes a rebalance: a retry loop here would never end.
    assert committed is False
    tried = unported(consumer)
    assert len(tried.commit_timeouts) == 1 and tried.commits == [] and time.monotonic() - started < 1.0


def test_a_fenced_static_member_names_its_instance_id(tmp_path: Path) -> None:
    s = settings(tmp_path, group_instance_id="lstmd-0")
    kafka = memory_kafka(s)
    cp = memory_delivery(kafka, s)
    kafka.faults.commit.append(FencedInstanceIdError())
    with pytest.raises(KafkaSetupError, match=r"lstmd-0.*LSTMD_GROUP_INSTANCE_ID"):
        cp.commit(memory_member(kafka, s), Checkpoint(offsets={TP: 5}))


def test_a_producer_is_awaited_while_the_cluster_does_not_answer(tmp_path: Path) -> None:
    s = settings(tmp_path)
    kafka = memory_kafka(s)
    kafka.faults.connect += [KafkaTimeoutError("Unable to bootstrap")] * 2
    cp = memory_delivery(kafka, s)
    assert kafka.faults.connect == [] and len(kafka.producers) == 1  # two refusals, then one built
    assert unported_producer(cp.producer) is kafka.producers[0]


def test_no_producer_is_built_past_the_shutdown_deadline(tmp_path: Path) -> None:
    """A producer replaced after the deadline (an abort during a broker outage) would
    not be used, and building one may wait for the cluster: librdkafka's
    init_transactions held a SIGTERM'd daemon 5 s past LSTMD_SHUTDOWN_TIMEOUT_S."""
    s = settings(tmp_path, delivery="exactly-once")
    kafka = memory_kafka(s)
    abandon = threading.Event()
    cp = memory_delivery(kafka, s, abandon=abandon)
    abandon.set()
    with pytest.raises(DeliveryFailed, match="asked to stop"):
        cp.restart()
    assert len(kafka.producers) == 1 and "close" in kafka.producers[0].calls


def test_an_expelled_member_commits_no_transaction(tmp_path: Path) -> None:
    s = settings(tmp_path, delivery="exactly-once")
    kafka = memory_kafka(s)
    cp = memory_delivery(kafka, s)
    [producer] = kafka.producers
    with pytest.raises(TransactionFailed):
        cp.commit(memory_member(kafka, s, expelled=True), Checkpoint(outputs=[output()], offsets={TP: 5}))
    assert "send_offsets_to_transaction" not in producer.calls
    assert "commit_transaction" not in producer.calls
    assert producer.calls[-1] == "abort_transaction"


def test_a_fenced_producer_is_replaced_after_the_abort_fails(tmp_path: Path) -> None:
    s = settings(tmp_path, delivery="exactly-once")
    kafka = memory_kafka(s)
    cp = memory_delivery(kafka, s)
    made = kafka.producers
    kafka.fail_sends = lambda *_: KafkaTimeoutError()
    kafka.faults.abort_transaction.append(ProducerFencedError())
    with pytest.raises(TransactionFailed):
        cp.commit(memory_member(kafka, s), Checkpoint(outputs=[output()], offsets={TP: 5}))
    assert unported_producer(cp.producer) is made[1] and "close" in made[0].calls
    assert made[1].calls == ["init_transactions"]


def test_an_expelled_member_writes_no_state_records(tmp_path: Path) -> None:
    s = settings(tmp_path)
    kafka = memory_kafka(s)
    cp = memory_delivery(kafka, s)
    [producer] = kafka.producers
    state = StateRecord(0, "a", b"state")
    with pytest.raises(TransactionFailed):  # the run loop restores, as after an abort
        cp.commit(
            memory_member(kafka, s, expelled=True),
            Checkpoint(outputs=[output()], states=[state], offsets={TP: 5}),
        )
    # The outputs are out (a restart repeats them identically); no state record is.
    assert [topic for topic, _ in producer.sent] == ["out"]


def restore(
    s: Settings, records: list[tuple[bytes, bytes | None]], kafka: MemoryKafka | None = None
) -> dict[str, SavedState]:
    """Restore partition 0 of the state topic holding `records`."""
    kafka = kafka or memory_kafka(s)
    for key, value in records:
        kafka.produce(s.state_topic, key, value)
    restorer = Restorer(ported(kafka.reader()), s, Metrics())
    restorer.begin([0])
    for _ in range(5):
        done = restorer.step()
        if done:
            return done[0]
    raise AssertionError("the restore never finished")


def test_an_unreadable_state_record_starts_the_sequence_over(tmp_path: Path) -> None:
    good = SequenceState(tensors=[np.array([1.0], np.float32)], n=1, watermark=4).snapshot("m@1")
    states = restore(settings(tmp_path), [(b"a", good), (b"b", good), (b"a", b"not a state")])
    # "a" must not fall back to its older record: that state is behind its inputs. It
    # starts over, announced, and keeps the only watermark left (a lower bound).
    assert sorted(states) == ["a", "b"] and states["b"][1] == "m@1"
    lost, saved_by = states["a"]
    assert saved_by == UNREADABLE and lost.tensors is None and lost.watermark == 4
    proc, _ = make(model_id="m@1")
    evicted = adopt(proc.store, proc.model_id, 0, states)
    assert [(e.key, e.cause, e.watermark) for e in evicted] == [("a", "unreadable", 4)]
    assert proc.store.watermark(0, "a") == 4


def test_a_state_record_with_misfit_tensors_keeps_its_watermark(tmp_path: Path) -> None:
    fits = SequenceState(tensors=[np.array([1.0], np.float32)], n=2, watermark=6, last_step=3)
    misfit = SequenceState(tensors=[np.zeros(5, np.float32)], n=9, watermark=8, last_step=7)
    corrupt = misfit.snapshot("m@1")[:-4]  # a tensor cut short: the header still reads
    states = restore(
        settings(tmp_path),
        [(b"a", fits.snapshot("m@1")), (b"b", misfit.snapshot("m@1")), (b"c", corrupt)],
    )
    proc, metrics = make(model_id="m@1")
    evicted = adopt(proc.store, proc.model_id, 0, states, state_shapes=[(1,)])
    assert sorted((e.key, e.cause, e.n, e.watermark) for e in evicted) == [
        ("b", "unreadable", 9, 8),
        ("c", "unreadable", 9, 8),
    ]
    assert [proc.store.watermark(0, k) for k in "abc"] == [6, 8, 8]
    proc.announce(evicted)
    assert metrics.registry.get_sample_value("lstmd_evictions_total", {"cause": "unreadable"}) == 2
    # Served on: "a" continues, "b" starts over above its watermark and keeps its last step.
    got = outputs(proc, recs([("a", {"x": [1]}), ("b", {"x": [1], "step": 7}), ("b", {"x": [2]})], start=9))
    assert [(o["seq"], o["n"]) for o in got] == [("a", 3), ("b", 1)]


def test_a_forgotten_sequence_is_not_restored_and_the_bound_holds_after_a_restore(tmp_path: Path) -> None:
    def ended(watermark: int) -> bytes:  # an evicted sequence's reset record, evicted in order
        evicted_at = time.monotonic() - 100 + watermark
        return SequenceState(watermark=watermark, last_step=7, last_seen=evicted_at).snapshot("m@1")

    # "a" was forgotten by the previous owner (its tombstone), b, c, d were remembered.
    records = [(b"a", ended(1)), (b"b", ended(2)), (b"c", ended(3)), (b"d", ended(4)), (b"a", None)]
    states = restore(settings(tmp_path), records)
    assert sorted(states) == ["b", "c", "d"]
    proc, _ = make(model_id="m@1")
    proc.store.max_ended = 2
    proc.store.forget_ended_before(0, 5)  # the partition's committed position, read when assigned
    assert adopt(proc.store, proc.model_id, 0, states) == []
    # This process remembers fewer: the oldest restored goes, its record deleted.
    assert proc.store.ended() == 2 and proc.store.watermark(0, "b") == -1
    assert [(k, v) for _, k, v in proc.store.take_changes("m@1")] == [("b", None)]
    # A forgotten sequence's step 7 retried starts it anew; a remembered one's is dropped.
    got = outputs(proc, recs([("a", {"x": [1], "step": 7}), ("c", {"x": [1], "step": 7})], start=5))
    assert [(o["seq"], o["n"]) for o in got] == [("a", 1)]


def test_a_restore_waits_for_the_state_partition_end(tmp_path: Path) -> None:
    good = SequenceState(tensors=[np.array([1.0], np.float32)], n=1, watermark=4).snapshot("m@1")
    s = settings(tmp_path)
    kafka = memory_kafka(s)
    kafka.faults.offsets += [KafkaTimeoutError("no leader")] * 2
    states = restore(s, [(b"a", good)], kafka)
    assert states["a"][0].watermark == 4 and kafka.faults.offsets == []


def test_read_on_the_state_topic_revoked_ends_the_daemon_naming_it(tmp_path: Path) -> None:
    s = settings(tmp_path)
    kafka = memory_kafka(s)
    kafka.produce(s.state_topic, b"a", None)
    kafka.faults.read.append(TopicAuthorizationFailedError())
    restorer = Restorer(ported(kafka.reader()), s, Metrics())
    restorer.begin([0])
    with pytest.raises(KafkaSetupError, match=r"g\.state.*LSTMD_STATE_TOPIC"):
        restorer.step()


def test_an_expelled_member_commits_no_transaction_without_offsets(tmp_path: Path) -> None:
    # A tombstone alone (no new offsets) must not land over the next owner's state.
    s = settings(tmp_path, delivery="exactly-once")
    kafka = memory_kafka(s)
    cp = memory_delivery(kafka, s)
    [producer] = kafka.producers
    with pytest.raises(TransactionFailed):
        cp.commit(memory_member(kafka, s, expelled=True), Checkpoint(states=[StateRecord(0, "a", None)]))
    assert "commit_transaction" not in producer.calls
    assert producer.calls[-1] == "abort_transaction"


def test_a_retry_at_sigterm_goes_on_until_the_shutdown_deadline(tmp_path: Path) -> None:
    s = settings(tmp_path)
    kafka = memory_kafka(s)
    kafka.fail_sends = lambda *_: KafkaTimeoutError("broker down")
    stop, abandon = threading.Event(), threading.Event()
    cp = memory_delivery(kafka, s, stop=stop, abandon=abandon)
    stop.set()  # SIGTERM: the checkpoint in hand still retries...
    threading.Timer(1.5, abandon.set).start()  # ...until the deadline
    started = time.monotonic()
    with pytest.raises(DeliveryFailed):
        cp.commit(memory_member(kafka, s), Checkpoint(outputs=[output()], offsets={TP: 5}))
    assert 1.4 < time.monotonic() - started < 5 and len(kafka.producers) >= 2  # retried, on a new producer


def test_a_partial_failure_is_resent_in_each_keys_order(tmp_path: Path) -> None:
    s = settings(tmp_path)
    kafka = memory_kafka(s)
    lost: list[bytes | None] = []

    def first_of_a_fails(topic: str, key: bytes | None, value: bytes | None) -> KafkaError | None:
        if key == b"a" and value == b"1" and not lost:
            lost.append(value)
            return KafkaTimeoutError("one record lost")
        return None

    kafka.fail_sends = first_of_a_fails
    cp = memory_delivery(kafka, s)
    records = [output(key=b"a", value=b"1"), output(key=b"b", value=b"x"), output(key=b"a", value=b"2")]
    assert cp.commit(memory_member(kafka, s), Checkpoint(outputs=records, offsets={TP: 3}))
    # "a"=2 was acknowledged before "a"=1 was resent: it goes again after it, and the
    # last copy of each of a's records is in a's order; "b" is not repeated.
    assert kafka.values(s.output_topic) == [b"x", b"2", b"1", b"2"]
