"""The run loop's policies, through their public seams: what a restore installs
(states of this model, never another model's), when a checkpoint is due and
what it carries, and the partition lifecycle the probes read."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from kafka.errors import (
    FencedInstanceIdError,
    IllegalStateError,
    KafkaConnectionError,
    ProducerFencedError,
    RebalanceInProgressError,
)

from daemon.core.state import SavedState, SequenceState, StateStore
from daemon.errors import KafkaSetupError
from daemon.ops.health import Health
from daemon.streaming import loop as loop_module
from daemon.streaming.lifecycle import Partitions, Phase
from daemon.streaming.loop import RunLoop
from daemon.streaming.policy import CheckpointPolicy
from daemon.streaming.restore import adopt
from tests.support.backends import Memory, unported, unported_producer
from tests.support.fakes import (
    TP,
    make,
    outputs,
    recs,
)


def policy(store: StateStore, interval_s: float = 1.0, now: list[float] | None = None) -> CheckpointPolicy:
    """At-least-once checkpoints of model "new@1", on a clock the test moves by hand."""
    clock = now if now is not None else [0.0]
    return CheckpointPolicy(store, "new@1", interval_s=interval_s, every_batch=False, clock=lambda: clock[0])


def test_a_state_of_another_model_is_dropped_announced_and_keeps_its_watermark() -> None:
    proc, _ = make(model_id="new@1")
    mine = SequenceState(tensors=[np.array([2.0], np.float32)], n=2, watermark=7)
    theirs = SequenceState(tensors=[np.array([9.0], np.float32)], n=4, watermark=8)
    evicted = adopt(
        proc.store, proc.model_id, 0, {"a": SavedState(mine, "new@1"), "b": SavedState(theirs, "old@0")}
    )
    assert [(e.key, e.cause, e.n, e.watermark) for e in evicted] == [("b", "model_changed", 4, 8)]
    notice = orjson.loads(proc.announce(evicted)[0].value or b"")
    assert notice["evicted"] is True and notice["cause"] == "model_changed"
    # "a" continues from its restored state; "b" starts over above its watermark.
    got = outputs(
        proc, recs([("b", {"x": [8]}), ("a", {"x": [1]}), ("b", {"x": [1]})], start=8)
    )  # b@8 is at its watermark: already answered
    assert [(o["seq"], o["y"], o["n"]) for o in got] == [("a", [3.0], 3), ("b", [1.0], 1)]


def test_a_renamed_model_file_is_the_same_model() -> None:
    """Identity is the file's content: a state saved as a@<hash> is adopted under
    b@<hash>; one saved under other content is dropped."""
    proc, _ = make(model_id="b@0123456789ab")
    one = np.array([1.0], np.float32)
    renamed = SequenceState(tensors=[one], n=3, watermark=4)
    other = SequenceState(tensors=[one], n=2, watermark=5)
    states = {"r": SavedState(renamed, "a@0123456789ab"), "o": SavedState(other, "a@ba9876543210")}
    evicted = adopt(proc.store, proc.model_id, 0, states)
    assert [(e.key, e.cause) for e in evicted] == [("o", "model_changed")]
    got = outputs(proc, recs([("r", {"x": [1]}), ("o", {"x": [1]})], start=6))
    assert [(o["seq"], o["y"], o["n"]) for o in got] == [("r", [2.0], 4), ("o", [1.0], 1)]


def test_capacity_eviction_is_announced_in_the_batch() -> None:
    proc, _ = make(model_id="new@1", max_sequences=2)
    out = proc.process(recs([("a", {"x": [1]}), ("b", {"x": [1]}), ("c", {"x": [1]})]))
    notices = [orjson.loads(o.value or b"") for o in out if o.notice]
    assert [(n["seq"], n["cause"]) for n in notices] == [("a", "capacity")]
    assert len(proc.store) == 2


def test_after_a_restore_the_oldest_watermark_is_evicted_first() -> None:
    # Version-1 records carry no last use: all count as used when the restore began.
    proc, _ = make(model_id="new@1", max_sequences=2)
    one = np.array([1.0], np.float32)
    restored = {
        key: SavedState(SequenceState(tensors=[one], n=1, watermark=wm, last_seen=100.0), "new@1")
        for key, wm in (("late", 9), ("early", 3))
    }
    adopt(proc.store, proc.model_id, 0, restored)
    out = proc.process(recs([("new", {"x": [1]})], start=10))
    assert [o.key for o in out if o.notice] == [b"early"]


def test_after_a_restore_the_least_recently_used_is_evicted_first() -> None:
    proc, _ = make(model_id="new@1", max_sequences=2)
    one = np.array([1.0], np.float32)
    now = time.monotonic()
    stale = SequenceState(tensors=[one], n=1, watermark=9, last_seen=now - 3600)
    fresh = SequenceState(tensors=[one], n=1, watermark=3, last_seen=now - 1)
    restored = {
        key: SequenceState.from_snapshot(state.snapshot("new@1"))
        for key, state in (("stale", stale), ("fresh", fresh))
    }
    adopt(proc.store, proc.model_id, 0, restored)
    out = proc.process(recs([("new", {"x": [1]})], start=10))
    assert [o.key for o in out if o.notice] == [b"stale"]
    # The idle clock survives the restore too: an hour idle is evicted at once.
    assert [e.key for e in proc.store.evict_idle(600)] == []  # "stale" is gone already
    assert [e.key for e in proc.store.evict_idle(0.9)] == ["fresh"]


def test_offsets_of_a_deferred_commit_are_kept_for_the_next() -> None:
    proc, _ = make(model_id="new@1")
    pol = policy(proc.store)
    batch = recs([("a", {"x": [1]})])
    out = proc.process(batch)
    pol.processed(batch)
    first = pol.next_checkpoint(out)
    assert first is not None and first.offsets == {TP: 1}
    pol.checkpointed(first, committed=False)  # the group was rebalancing
    assert pol.offsets == {TP: 1}
    batch = recs([("b", {"x": [1]})], start=1)
    out = proc.process(batch)
    pol.processed(batch)
    second = pol.next_checkpoint(out)
    assert second is not None and second.offsets == {TP: 2} and pol.offsets == {}
    pol.checkpointed(second, committed=True)
    assert pol.offsets == {}


def test_an_eviction_is_checkpointed_at_once() -> None:
    proc, _ = make(model_id="new@1", max_sequences=1)
    pol = policy(proc.store, interval_s=60.0)
    batch = recs([("a", {"x": [1]})])
    out = proc.process(batch)
    pol.processed(batch)
    assert not pol.due(out)  # within the interval, no eviction: outputs only
    first = pol.next_checkpoint(out)
    assert first is not None
    pol.checkpointed(first, committed=True)
    batch = recs([("b", {"x": [1]})], start=1)
    out = proc.process(batch)
    pol.processed(batch)
    assert pol.due(out)  # still within the interval, but "a" was evicted
    last = pol.next_checkpoint(out)
    assert last is not None
    assert [o.notice for o in last.outputs] == [False, True]
    # Not only the notice: the reset record and the offsets, within the interval.
    assert [(s.key, s.value is not None) for s in last.states if s.key == "a"] == [("a", True)]
    assert SequenceState.from_snapshot(next(s.value for s in last.states if s.key == "a") or b"")[0].n == 0
    assert last.offsets == {TP: 2}


def test_an_evicted_sequence_past_the_bound_is_tombstoned_and_its_step_forgotten() -> None:
    """LSTMD_MAX_ENDED_SEQUENCES=1: of two evicted sequences, the older is forgotten
    once its eviction is committed: its record deleted, its step check given up."""
    proc, metrics = make(model_id="new@1", max_sequences=1)
    proc.store.max_ended = 1
    pol = policy(proc.store)
    for offset, key in enumerate("abc"):  # b evicts a, c evicts b
        batch = recs([(key, {"x": [1], "step": 1})], start=offset)
        out = proc.process(batch)
        pol.processed(batch)
        cp = pol.next_checkpoint(out)
        assert cp is not None
        pol.checkpointed(cp, committed=True)
    last = pol.next_checkpoint([])
    assert last is not None and [(s.key, s.value) for s in last.states] == [("a", None)]
    assert proc.store.ended() == 1
    # b's step 1 retried is still a duplicate; a's is the first step of a new sequence.
    got = outputs(proc, recs([("b", {"x": [1], "step": 1}), ("a", {"x": [1], "step": 1})], start=3))
    assert [(o["seq"], o["n"]) for o in got if not o.get("evicted")] == [("a", 1)]
    assert metrics.registry.get_sample_value("lstmd_duplicates_skipped_total", {"cause": "step"}) == 1


def test_a_checkpoint_is_due_after_its_interval_and_carries_only_what_changed() -> None:
    proc, _ = make(model_id="new@1")
    now = [0.0]
    pol = policy(proc.store, interval_s=1.0, now=now)
    assert pol.next_checkpoint([]) is None  # nothing pending: no checkpoint at all
    batch = recs([("a", {"x": [1]}), ("a", {"end": True})])
    out = proc.process(batch)
    pol.processed(batch)
    assert not pol.due(out) and pol.due(out, force=True)
    now[0] = 1.0
    assert pol.due(out)
    cp = pol.next_checkpoint(out)
    assert cp is not None and [s.key for s in cp.states] == ["a"]  # a's reset record
    pol.checkpointed(cp, committed=True)
    # The reset is committed: its watermark is no longer needed, the next checkpoint
    # deletes it.
    later = pol.next_checkpoint([])
    assert later is not None and [(s.key, s.value) for s in later.states] == [("a", None)]


def test_a_released_partition_leaves_nothing_pending() -> None:
    proc, _ = make(model_id="new@1")
    pol = policy(proc.store)
    pol.processed(recs([("a", {"x": [1]})]))
    pol.release(TP)
    assert pol.offsets == {}


def test_readiness_follows_the_partition_lifecycle() -> None:
    health = Health(60)
    health.model_loaded = True
    parts = Partitions()
    health.watch(parts)
    assert health.ready() == (False, "no partitions assigned (starting)")
    parts.assign([0, 1])
    assert parts.phase(0) is Phase.ASSIGNED and not parts.serving(0)
    assert health.ready() == (False, "restoring partitions [0, 1]")
    parts.begin_restore(0)
    assert parts.phase(0) is Phase.RESTORING and parts.in_phase(Phase.ASSIGNED) == [1]
    parts.restored(1)  # not restoring yet: no change
    assert parts.phase(1) is Phase.ASSIGNED
    parts.begin_restore(1)
    parts.restored(0)
    parts.restored(1)
    assert parts.phase(1) is Phase.ACTIVE and health.ready() == (True, "ok")
    parts.advance(1, 42)
    assert parts.position(1) == 42
    parts.release(1)
    assert parts.owned() == {0} and parts.position(1) is None and parts.phase(1) is None


def one_record(tmp_path: Path, **extra: Any) -> tuple[Memory, RunLoop]:
    """A run loop on the in-memory Kafka that has processed one record of key "a"."""
    kafka = Memory()
    s = kafka.settings(tmp_path, **extra)
    kafka.produce(s.input_topic, [(b"a", orjson.dumps({"x": [1]}), 0)])
    proc, metrics = make()
    loop = kafka.loop(s, proc, metrics)
    kafka.run_until([loop], lambda: metrics.registry.get_sample_value("lstmd_events_consumed_total") == 1)
    return kafka, loop


def shut_down(loop: RunLoop) -> None:
    """SIGTERM: the shutdown phase stepped to its end."""
    loop.stop.set()
    while loop.step():
        pass


def test_a_static_member_fenced_at_join_ends_with_exit_2_naming_the_variable(tmp_path: Path) -> None:
    """kafka-python raises FencedInstanceIdError from poll() when a join is fenced (two
    pods with one LSTMD_GROUP_INSTANCE_ID): a configuration error, not a crash loop."""
    kafka = Memory()
    s = kafka.settings(tmp_path, group_instance_id="pod-0")
    proc, metrics = make()
    loop = kafka.loop(s, proc, metrics)
    kafka.kafka.faults.poll.append(FencedInstanceIdError())
    with pytest.raises(KafkaSetupError, match="'pod-0' \\(LSTMD_GROUP_INSTANCE_ID\\)"):
        loop.step()


def test_sigterm_during_a_rebalance_retries_the_deferred_final_commit(tmp_path: Path) -> None:
    """SIGTERM while the group rebalances: the final checkpoint's commit is deferred
    (RebalanceInProgressError); the daemon keeps polling, paused, and commits once the
    rebalance is over, instead of exiting with nothing committed."""
    kafka, loop = one_record(tmp_path, checkpoint_interval_ms=60_000)
    group = kafka.kafka.group(loop.settings.group_id)
    assert group.committed == {}
    kafka.kafka.faults.commit += [RebalanceInProgressError(), RebalanceInProgressError()]
    consumer = unported(loop.clients.consumer)
    polls = consumer.polls
    shut_down(loop)
    assert group.committed == {TP: 1}  # committed after the rebalance
    assert consumer.polls - polls == 2  # polled (paused) while the commit was deferred


def test_an_aborted_final_transaction_is_not_called_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly-once, SIGTERM with work in hand whose transaction aborts (fenced by a
    rebalance, say): the loop rewinds, nothing of it is committed, and the log says
    so (`shutdown_incomplete`), not `shutdown_checkpointed`."""
    events: list[str] = []

    class Log:  # the run loop's log events, whatever structlog's configuration
        def __getattr__(self, level: str) -> Callable[..., None]:
            return lambda event, **_: events.append(event)

    monkeypatch.setattr(loop_module, "log", Log())
    kafka, loop = one_record(tmp_path, delivery="exactly-once")
    producer = unported_producer(loop.clients.delivery.producer)
    assert producer.calls.count("commit_transaction") == 1
    loop.store.mark_changed(0, "a")  # a changed state in hand at SIGTERM
    kafka.kafka.faults.commit_transaction.append(ProducerFencedError("a rebalance moved the partition"))
    shut_down(loop)
    assert producer.calls.count("abort_transaction") == 1
    assert "shutdown_incomplete" in events
    assert "shutdown_checkpointed" not in events


def test_a_deadline_passed_while_rewinding_names_the_partitions_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly-once, SIGTERM during a broker outage: the final transaction aborts, and
    the rewind cannot read the committed offset before the shutdown deadline. The
    warning still names the partition its next owner repeats (seen empty in CI: the
    partition was marked as rewinding only after the committed offsets were read)."""
    warned: list[dict[str, Any]] = []

    class Log:  # the run loop's log events, whatever structlog's configuration
        def __getattr__(self, level: str) -> Callable[..., None]:
            return lambda event, **kw: warned.append(kw) if event == "shutdown_incomplete" else None

    monkeypatch.setattr(loop_module, "log", Log())
    kafka, loop = one_record(tmp_path, delivery="exactly-once")
    loop.store.mark_changed(0, "a")
    kafka.kafka.faults.commit_transaction.append(KafkaConnectionError("the broker is away"))
    kafka.kafka.faults.committed.append(KafkaConnectionError("the broker is away"))
    loop.abandon.set()  # the shutdown deadline has passed
    loop.stop.set()
    loop.serve()
    assert [w["repeated_by_next_owner"] for w in warned] == [
        {str(TP.partition): {"committed": None, "processed_to": None}}
    ]
    assert "unknown at shutdown" in warned[0]["reason"]


def test_a_poll_that_fails_while_the_broker_is_away_is_polled_again(tmp_path: Path) -> None:
    """kafka-python 3.0.12 raises KafkaConnectionError out of `poll` when its
    coordinator lookup meets a broker that is down (seen to end a worker just after
    its assignment): a retriable error is polled again and never beats liveness; a
    permanent one still ends the daemon."""
    kafka, loop = one_record(tmp_path)
    beaten = loop.health.last_loop
    kafka.kafka.faults.poll.append(KafkaConnectionError("111 ECONNREFUSED"))
    assert loop.step() is True
    assert loop.health.last_loop == beaten
    kafka.kafka.faults.poll.append(IllegalStateError("closed"))
    with pytest.raises(IllegalStateError):
        loop.step()
