"""Restore: a newly assigned partition's states read back from the compacted state topic.

A partition is served only once its states are back (see the lifecycle in
loop.py): its inputs at or below each state's watermark are then recognised as
already applied.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import AuthorizationError, KafkaError

from daemon.config import Settings
from daemon.core.state import (
    UNREADABLE,
    Eviction,
    SequenceState,
    SnapshotError,
    StateStore,
    StateTensors,
    same_model,
)
from daemon.kafka.acl import authorization_failure
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics

log = get_logger(__name__)

# One wait for the state partitions' end offsets (asked again at the next step): the
# client's default, 30 s, would outlast a shutdown deadline during a broker outage.
END_TIMEOUT_MS = 1000

# One restore poll never holds the loop longer than this, so heartbeats aside the
# poll loop keeps its max.poll.interval promise and its liveness beat.
RESTORE_SLICE_S = 0.5
# One wait for a state partition's read position.
POSITION_TIMEOUT_MS = 200


@contextlib.contextmanager
def refusals(settings: Settings, topic: str) -> Iterator[None]:
    """No Describe or Read on a topic read by assignment (or revoked mid-run) is
    permanent: the daemon stops, naming the topic."""
    try:
        yield
    except AuthorizationError as exc:
        raise authorization_failure(settings, exc, topic) from None


@dataclass
class _Restoring:
    end: int | None  # None: the state partition's end is not known yet (no leader)
    started: float
    began: float = field(default_factory=time.monotonic)  # version-1 records' last use
    states: dict[str, tuple[SequenceState, str]] = field(default_factory=dict)


class Restorer:
    """Reads a partition's states back from the compacted state topic, in slices
    between polls, up to the end the topic had when the restore began."""

    def __init__(self, consumer: KafkaConsumer, settings: Settings, metrics: Metrics) -> None:
        self.consumer = consumer  # no group, read_committed
        self.settings = settings
        self.topic = settings.state_topic_name
        self.metrics = metrics
        self.active: dict[int, _Restoring] = {}

    def _refusals(self) -> contextlib.AbstractContextManager[None]:
        return refusals(self.settings, self.topic)

    def begin(self, partitions: Iterable[int]) -> None:
        new = [p for p in partitions if p not in self.active]
        if not new:
            return
        tps = [TopicPartition(self.topic, p) for p in new]
        now = time.perf_counter()
        for tp in tps:
            self.active[tp.partition] = _Restoring(end=None, started=now)
        with self._refusals():
            self._assign()
            self.consumer.seek_to_beginning(*tps)
            self._find_ends()

    def _find_ends(self) -> bool:
        """Learn where each restore ends; False while the broker cannot say (the
        partition has no leader during an outage): the next step asks again."""
        unknown = [TopicPartition(self.topic, p) for p, r in self.active.items() if r.end is None]
        if not unknown:
            return True
        try:
            ends = self.consumer.end_offsets(unknown, timeout_ms=END_TIMEOUT_MS)
        except AuthorizationError:
            raise  # permanent: see _refusals
        except KafkaError as exc:
            log.warning("restore_waiting", partitions=sorted(tp.partition for tp in unknown), error=str(exc))
            return False
        for tp in unknown:
            self.active[tp.partition].end = ends[tp]
        return True

    def cancel(self, partitions: Iterable[int]) -> None:
        if any(self.active.pop(p, None) is not None for p in list(partitions)):
            self._assign()

    def _assign(self) -> None:
        self.consumer.assign([TopicPartition(self.topic, p) for p in self.active])

    def step(self) -> dict[int, dict[str, tuple[SequenceState, str]]]:
        """Read for at most one slice; return the partitions now complete."""
        with self._refusals():
            return self._step()

    def _step(self) -> dict[int, dict[str, tuple[SequenceState, str]]]:
        if not self._find_ends():
            return {}
        deadline = time.monotonic() + RESTORE_SLICE_S
        while self.active and time.monotonic() < deadline:
            done = self._finished()
            if done:
                return done
            batch = self.consumer.poll(timeout_ms=100, max_records=5000)
            for tp, records in batch.items():
                target = self.active.get(tp.partition)
                if target is None:
                    continue
                for rec in records:
                    key = rec.key.decode("utf-8", "replace") if rec.key is not None else ""
                    if rec.value is None:
                        target.states.pop(key, None)
                        continue
                    try:
                        target.states[key] = SequenceState.restore(rec.value, target.began)
                    except SnapshotError as exc:
                        # An older record of the key would be a wrong state, not a
                        # fallback: the sequence starts over, announced, and keeps
                        # its watermark so no input is applied twice.
                        previous = target.states.get(key)
                        lost = SequenceState.unreadable(rec.value, previous[0] if previous else None)
                        target.states[key] = (lost, UNREADABLE)
                        log.error(
                            "state_record_unreadable",
                            partition=tp.partition,
                            key=key,
                            offset=rec.offset,
                            error=str(exc),
                            watermark=lost.watermark,
                            action="sequence starts over, announced",
                        )
        return self._finished()

    def _finished(self) -> dict[int, dict[str, tuple[SequenceState, str]]]:
        done: dict[int, dict[str, tuple[SequenceState, str]]] = {}
        for p, r in list(self.active.items()):
            if r.end is None:
                continue
            try:
                position = self.consumer.position(
                    TopicPartition(self.topic, p), timeout_ms=POSITION_TIMEOUT_MS
                )
            except KafkaError:  # not answered in time: the next step asks again
                continue
            if position is not None and position >= r.end:
                done[p] = r.states
                self.metrics.restore.observe(time.perf_counter() - r.started)
                self.metrics.states_restored.inc(len(r.states))
                del self.active[p]
        if done:
            self._assign()
        return done


def adopt(
    store: StateStore,
    model_id: str,
    partition: int,
    states: dict[str, tuple[SequenceState, str]],
    state_shapes: Sequence[tuple[int, ...]] | None = None,
) -> list[Eviction]:
    """Install a restored partition's states; returns the evictions to announce.

    A state saved under another model (other file content: `same_model`; a
    renamed file is the same model) is never applied to this one: it is
    dropped (its watermark kept) and announced, and the sequence starts over.
    Installed in the order the keys were last used in (the snapshot's last use,
    then the watermark), so the least recently used state is evicted first after
    a restore too.
    """
    evicted = []
    order = sorted(states.items(), key=lambda kv: (kv[1][0].last_seen, kv[1][0].watermark))
    for key, (state, saved_by) in order:
        cause = None
        if saved_by == UNREADABLE or (state.tensors is not None and not _fits(state.tensors, state_shapes)):
            cause = "unreadable"  # its tensors are lost, or do not fit this model
        elif not same_model(saved_by, model_id) and state.n:
            cause = "model_changed"
        if cause is not None:
            evicted.append(Eviction(partition, key, cause, state.n, state.watermark))
            state = SequenceState(watermark=state.watermark, last_step=state.last_step)
            store.touched(partition, key)
        store.install(partition, key, state)
    # Ended sequences restored past LSTMD_MAX_ENDED_SEQUENCES are forgotten now, oldest
    # first (their records deleted by the next checkpoint), not at the next commit.
    store.forget_ended()
    return evicted


def _fits(tensors: StateTensors, shapes: Sequence[tuple[int, ...]] | None) -> bool:
    """The tensors have the model's state shapes (unknown shapes: assumed to)."""
    if shapes is None:
        return True
    return len(tensors) == len(shapes) and all(
        tuple(t.shape) == s for t, s in zip(tensors, shapes, strict=False)
    )
