"""At-least-once checkpoints that never stall the run loop (delivery/pending.py), driven
one `RunLoop.step()` at a time on the in-memory Kafka.

The broker holds every acknowledgement until the test answers it (`hold_acks`), so a
step that waited for one would never return: `step` runs each step in a thread and
fails if it does not return within a bound (then ends the wait through the shutdown
deadline's `abandon`). The journal of the in-memory Kafka tells the order of sends,
acknowledgements and commits. The engine is the running sum of x (SumEngine), the
checkpoint interval 0: every poll batch cuts a checkpoint.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError, RebalanceInProgressError

from daemon.kafka.retry import Backoff
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery import at_least_once, pending
from daemon.streaming.loop import RunLoop
from tests.support.backends import Memory, unported
from tests.support.fakes import TP, make

# Longer than a step ever takes here; far shorter than a flush's wait (10 s).
STEP_BOUND_S = 2.0
TP1 = TopicPartition("in", 1)


def step(rl: RunLoop) -> bool:
    """One step, which must return without waiting for an acknowledgement."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(rl.step()), daemon=True)
    thread.start()
    thread.join(STEP_BOUND_S)
    if thread.is_alive():
        rl.abandon.set()  # end the wait (the shutdown deadline's way) before failing
        thread.join(30)
        pytest.fail("the step waited for acknowledgements")
    return result[0]


def event(x: float = 1.0) -> bytes:
    return orjson.dumps({"x": [x]})


def held_loop(tmp_path: Path, partitions: int = 1) -> tuple[Memory, RunLoop, Metrics]:
    """A started loop whose broker holds every acknowledgement, its partitions active."""
    kafka = Memory()
    kafka.kafka.hold_acks = True
    s = kafka.settings(tmp_path, partitions=partitions, checkpoint_interval_ms=0)
    proc, metrics = make()
    rl = kafka.loop(s, proc, metrics)
    for _ in range(3):  # assigned, committed position read, restored: serving
        step(rl)
    return kafka, rl, metrics


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def entries(kafka: Memory, prefix: str) -> list[int]:
    """Indices of the journal's entries starting with `prefix`."""
    return [i for i, e in enumerate(kafka.kafka.journal) if e.startswith(prefix)]


def committed(kafka: Memory, tp: TopicPartition = TP) -> int | None:
    return kafka.kafka.group("g").committed.get(tp)


def test_a_due_checkpoint_does_not_wait_for_its_acknowledgements(tmp_path: Path) -> None:
    kafka, rl, metrics = held_loop(tmp_path)
    kafka.produce("in", [(b"a", event(), 0)])
    step(rl)  # a checkpoint is due (interval 0): cut, its output sent, queued
    kafka.produce("in", [(b"b", event(), 0)])
    step(rl)  # the loop went on: the next batch is taken and its output sent
    assert sample(metrics, "lstmd_events_consumed_total") == 2
    assert kafka.kafka.journal == ["send out " + repr(v) for _, v in kafka.kafka.producers[0].sent]
    assert len(entries(kafka, "send out")) == 2 and kafka.kafka.unacknowledged == 2
    assert sample(metrics, "lstmd_checkpoints_pending") == 2
    assert committed(kafka) is None


def test_states_wait_for_their_outputs_and_offsets_for_their_states(tmp_path: Path) -> None:
    """Mutations seen failing: states sent without `through() >= covers` (before their
    outputs' acknowledgements); the commit asked before the states are acknowledged."""
    kafka, rl, metrics = held_loop(tmp_path)
    kafka.produce("in", [(b"a", event(), 0), (b"b", event(2.0), 0)])
    step(rl)
    assert kafka.kafka.acknowledge(1) == 1  # a's output; b's still in flight
    step(rl)
    assert entries(kafka, "send in.state") == []  # a state waits for every output it covers
    kafka.kafka.acknowledge()
    step(rl)
    states = entries(kafka, "send in.state")
    assert len(states) == 2 and states[0] > max(entries(kafka, "ack out"))
    assert entries(kafka, "commit") == [] and committed(kafka) is None  # states unacknowledged
    kafka.kafka.acknowledge()
    step(rl)
    [commit] = entries(kafka, "commit")
    assert commit > max(entries(kafka, "ack in.state"))
    assert committed(kafka) == 2
    assert sample(metrics, "lstmd_checkpoints_pending") == 0
    assert sample(metrics, "lstmd_offset_commits_total") == 1
    assert sample(metrics, "lstmd_checkpoint_duration_seconds_count") == 1
    assert metrics.registry.get_sample_value("lstmd_state_records_written_total", {"kind": "state"}) == 2


def test_checkpoints_complete_in_order(tmp_path: Path) -> None:
    """A checkpoint's states wait for the outputs of every earlier checkpoint (an
    acknowledgement out of order does not let them go), and for the earlier
    checkpoint's commit. Mutation seen failing: advancing any queued checkpoint,
    not only the head."""
    kafka, rl, _ = held_loop(tmp_path, partitions=2)
    kafka.produce("in", [(b"a", event(), 0)])
    step(rl)
    kafka.produce("in", [(b"b", event(), 1)])
    step(rl)
    held = kafka.kafka._held  # the second checkpoint's output answered first
    held.pop(1).answer()
    step(rl)
    assert entries(kafka, "send in.state") == []
    kafka.kafka.acknowledge()  # the first checkpoint's output
    step(rl)
    assert len(entries(kafka, "send in.state")) == 1  # the first's state; the second waits
    kafka.kafka.acknowledge()
    step(rl)
    assert (committed(kafka), committed(kafka, TP1)) == (1, None)
    assert len(entries(kafka, "send in.state")) == 2  # the second's, after the first's commit
    kafka.kafka.acknowledge()
    step(rl)
    assert (committed(kafka), committed(kafka, TP1)) == (1, 1)


class _NoWait(Backoff):
    def wait(self) -> bool:  # retry at once
        return False


def _value(entry: str) -> dict[str, Any]:
    """The output value of a journal entry "send out b'...'" or "ack out b'...'"."""
    parsed: dict[str, Any] = orjson.loads(ast.literal_eval(entry.split(" ", 2)[2]))
    return parsed


def test_a_failed_output_falls_back_and_is_resent_in_key_order_before_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation seen failing: the queue not checking for a failed output before it
    writes the states (a state would then be written before the outputs it covers)."""
    monkeypatch.setattr(at_least_once, "Backoff", _NoWait)
    kafka, rl, metrics = held_loop(tmp_path)
    lost: list[int] = []

    def fail(topic: str, key: bytes | None, value: bytes | None) -> KafkaError | None:
        if topic == "out" and key == b"a" and not lost:
            lost.append(1)
            return KafkaTimeoutError("lost")
        return None

    kafka.kafka.fail_sends = fail
    kafka.produce("in", [(b"a", event(), 0), (b"b", event(), 0), (b"a", event(), 0)])
    step(rl)
    kafka.kafka.acknowledge()  # a's first output fails, the others are acknowledged
    kafka.kafka.ack_on_flush = True  # the synchronous way waits: the broker answers then
    step(rl)
    journal = kafka.kafka.journal
    acked = [(v["seq"], v["offset"]) for v in map(_value, (journal[i] for i in entries(kafka, "ack out")))]
    # a@2 was acknowledged before a@0 was lost: it goes again after it; b is not repeated.
    assert acked == [("b", 1), ("a", 2), ("a", 0), ("a", 2)]
    # Every state is written after the resent outputs are acknowledged, the offsets last.
    assert min(entries(kafka, "send in.state")) > max(entries(kafka, "ack out"))
    [commit] = entries(kafka, "commit")
    assert commit > max(entries(kafka, "ack in.state"))
    assert committed(kafka) == 3 and not rl.clients.delivery.failing()
    assert sample(metrics, "lstmd_predictions_produced_total") == 3


def test_a_failed_commit_falls_back_to_a_synchronous_one(tmp_path: Path) -> None:
    """Mutation seen failing: a failed asynchronous commit taken as done (the policy
    would count offsets as committed that the group never took)."""
    kafka, rl, _ = held_loop(tmp_path)
    kafka.kafka.faults.commit.append(RebalanceInProgressError())
    kafka.produce("in", [(b"a", event(), 0)])
    step(rl)
    kafka.kafka.acknowledge()
    step(rl)  # the state is sent
    kafka.kafka.acknowledge()
    kafka.kafka.ack_on_flush = True
    step(rl)  # its commit fails; the same step takes the synchronous way
    assert kafka.kafka.faults.commit == []  # the asynchronous commit met the rebalance
    assert committed(kafka) == 1 and entries(kafka, "commit") == [len(kafka.kafka.journal) - 1]
    assert len(entries(kafka, "send in.state")) == 1  # acknowledged already: not written again
    assert not rl.clients.delivery.failing() and not rl.policy.pending()


def test_outputs_unacknowledged_too_long_take_the_synchronous_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output topic deleted under the daemon: its outputs are never acknowledged.
    Mutation seen failing: no age bound (the checkpoint stayed queued, silently, and
    nothing said why no offset moved: tests/broker/test_bad_input.py waits for the
    synchronous flush's `flush_slow`)."""
    kafka, rl, _ = held_loop(tmp_path)
    kafka.produce("in", [(b"a", event(), 0)])
    step(rl)
    step(rl)
    assert not rl.clients.delivery.failing()  # young: it waits, the loop goes on
    monkeypatch.setattr(pending, "PENDING_LATE_S", 0.0)
    kafka.kafka.ack_on_flush = True
    step(rl)  # too old: the synchronous way (which flushes) commits it
    assert committed(kafka) == 1
    assert entries(kafka, "commit") == [len(kafka.kafka.journal) - 1]
    assert not rl.clients.delivery.failing() and not rl.policy.pending()


def test_past_the_bound_a_checkpoint_takes_every_pending_one_the_synchronous_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation seen failing: no bound on the queue."""
    monkeypatch.setattr(pending, "MAX_PENDING_CHECKPOINTS", 2)
    kafka, rl, metrics = held_loop(tmp_path)
    for _ in range(2):
        kafka.produce("in", [(b"a", event(), 0)])
        step(rl)
    assert sample(metrics, "lstmd_checkpoints_pending") == 2
    kafka.kafka.ack_on_flush = True
    kafka.produce("in", [(b"a", event(), 0)])
    step(rl)
    assert committed(kafka) == 3 and sample(metrics, "lstmd_checkpoints_pending") == 0
    assert len(entries(kafka, "send in.state")) == 1  # the key's newest state only: merged
    assert entries(kafka, "commit") == [len(kafka.kafka.journal) - 1]


def test_shutdown_checkpoints_every_pending_checkpoint(tmp_path: Path) -> None:
    """Mutation seen failing: the synchronous way without the pending checkpoints."""
    kafka, rl, _ = held_loop(tmp_path)
    for x in (1.0, 2.0):
        kafka.produce("in", [(b"a", event(x), 0)])
        step(rl)
    assert committed(kafka) is None
    kafka.kafka.ack_on_flush = True
    rl.stop.set()
    while step(rl):
        pass
    assert committed(kafka) == 2
    [state] = [r for r in kafka.kafka.records("in.state") if r.key == b"a"]
    assert state.offset == 0 and not rl.policy.pending()


def test_a_revocation_checkpoints_every_pending_checkpoint(tmp_path: Path) -> None:
    """A member joins: the partition it takes over is checkpointed in the revocation
    callback, pending checkpoints included, so its new owner repeats nothing.
    Mutation seen failing: `before_revoke` without the pending checkpoints."""
    kafka, rl, _ = held_loop(tmp_path, partitions=2)
    kafka.produce("in", [(b"a", event(), 0), (b"b", event(), 1)])
    step(rl)
    kafka.produce("in", [(b"b", event(), 1)])
    step(rl)
    assert (committed(kafka), committed(kafka, TP1)) == (None, None)
    kafka.kafka.ack_on_flush = True
    kafka.kafka.member("in")  # joins the group: partition 1 moves to it
    step(rl)
    assert committed(kafka, TP1) == 2
    assert rl.clients.consumer.assignment() == {TP}


def test_an_expelled_member_writes_no_state_of_a_pending_checkpoint(tmp_path: Path) -> None:
    """The group expelled the member after the checkpoint's outputs were acknowledged
    and before it noticed (SIGTERM then: the shutdown step moves the queue before any
    poll): its states are not written, nothing is committed, the loop rewinds.
    Mutation seen failing: the queue not asking `member` before it sends the states."""
    kafka, rl, _ = held_loop(tmp_path)
    kafka.produce("in", [(b"a", event(), 0)])
    step(rl)
    kafka.kafka.acknowledge()
    unported(rl.clients.consumer).expel()
    rl.stop.set()
    assert step(rl) is False  # the final checkpoint abandoned: the next owner repeats it
    assert entries(kafka, "send in.state") == [] and entries(kafka, "commit") == []
    assert committed(kafka) is None


def test_states_go_a_slice_per_step_and_the_commit_waits_for_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sending a thousand state records at once would stall the loop as waiting did
    (tens of ms). Mutation seen failing: every state record sent in one step."""
    monkeypatch.setattr(pending, "STATE_SEND_CHUNK", 2)
    monkeypatch.setattr(pending, "STATE_SEND_BUDGET_S", 0.0)  # one chunk a step
    kafka, rl, _ = held_loop(tmp_path)
    kafka.produce("in", [(key, event(), 0) for key in (b"a", b"b", b"c")])
    step(rl)
    kafka.kafka.acknowledge()
    step(rl)
    assert len(entries(kafka, "send in.state")) == 2
    kafka.kafka.acknowledge()
    step(rl)
    assert len(entries(kafka, "send in.state")) == 3 and committed(kafka) is None
    kafka.kafka.acknowledge()
    step(rl)
    assert committed(kafka) == 3
