"""Restore: a newly assigned partition's states read back from the compacted state topic.

A partition is served only once its states are back (see the lifecycle in
loop.py): its inputs at or below each state's watermark are then recognised as
already applied.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from daemon.config import Settings
from daemon.core.records import InputRecord
from daemon.core.state import (
    UNREADABLE,
    Eviction,
    SavedState,
    SequenceState,
    SnapshotError,
    StateStore,
    StateTensors,
    parse_state_key,
    same_model,
)
from daemon.kafka.port import Reader
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.catchup import CatchUp, Pace

log = get_logger(__name__)

# One wait for the state partitions' end offsets (asked again at the next step): the
# client's default, 30 s, would outlast a shutdown deadline during a broker outage.
END_TIMEOUT_MS = 1000

# One restore step never holds the loop longer than this, so heartbeats aside the
# poll loop keeps its max.poll.interval promise and its liveness beat.
RESTORE_SLICE_S = 0.5
# Records per restore poll: decoding a state costs little, the slice bounds the step.
RESTORE_POLL_RECORDS = 5000


@dataclass
class _Restoring:
    began: float = field(default_factory=time.monotonic)  # version-1 records' last use
    states: dict[str, SavedState] = field(default_factory=dict)
    # The states of models that followed the partition without serving it, by model
    # tag (daemon/streaming/follow.py), and the tags whose following marker is there.
    others: dict[str, dict[str, SavedState]] = field(default_factory=dict)
    following: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class FollowersLeft:
    """What a restored partition holds of models that followed it without serving it."""

    states: dict[str, dict[str, SavedState]]  # by model tag, then sequence id
    following: frozenset[str]  # the tags whose states are exact (their marker)


class _Snapshots:
    """What a restore does with the state topic: each key's newest record, decoded."""

    def bounds(self, partition: int, into: _Restoring, beginning: int | None, end: int) -> tuple[None, int]:
        return None, end  # the whole compacted partition

    def read(self, partition: int, into: _Restoring, records: Sequence[InputRecord]) -> None:
        for rec in records:
            owner, key, following = parse_state_key(rec.key)
            if following:
                assert owner is not None
                (into.following.add if rec.value is not None else into.following.discard)(owner)
                continue
            states = into.states if owner is None else into.others.setdefault(owner, {})
            if rec.value is None:
                states.pop(key, None)
                continue
            try:
                states[key] = SequenceState.from_snapshot(rec.value, into.began)
            except SnapshotError as exc:
                # An older record of the key would be a wrong state, not a
                # fallback: the sequence starts over, announced, and keeps
                # its watermark so no input is applied twice.
                previous = states.get(key)
                lost = SequenceState.unreadable(rec.value, previous[0] if previous else None)
                states[key] = SavedState(lost, UNREADABLE)
                log.error(
                    "state_record_unreadable",
                    partition=partition,
                    key=key,
                    offset=rec.offset,
                    error=str(exc),
                    watermark=lost.watermark,
                    action="sequence starts over, announced",
                )


class Restorer:
    """Reads a partition's states back from the compacted state topic, in slices
    between polls, up to the end the topic had when the restore began (a `CatchUp`)."""

    def __init__(self, consumer: Reader, settings: Settings, metrics: Metrics) -> None:
        self.consumer = consumer  # no group, read_committed
        self.metrics = metrics
        pace = Pace(RESTORE_SLICE_S, END_TIMEOUT_MS, RESTORE_POLL_RECORDS, RESTORE_POLL_RECORDS)
        self.reads = CatchUp[_Restoring](
            lambda: consumer,
            settings,
            settings.state_topic,
            _Snapshots(),
            pace,
            waiting="restore_waiting",
        )
        self.active = self.reads.active
        self._left: dict[int, FollowersLeft] = {}

    def begin(self, partitions: Iterable[int]) -> None:
        """Restore these partitions; where each ends is asked now (after the input
        partition's committed position: a transaction the previous owner committed
        is then on the state partition, its states and offsets together)."""
        new = [p for p in partitions if p not in self.active]
        if not new:
            return
        for p in new:
            self.reads.begin(p, _Restoring())
        self.reads.locate()

    def cancel(self, partitions: Iterable[int]) -> None:
        self.reads.cancel(list(partitions))

    def followers_left(self, partition: int) -> FollowersLeft:
        """Of a partition `step` returned: the states its followers left (once)."""
        return self._left.pop(partition, FollowersLeft({}, frozenset()))

    def step(self) -> dict[int, dict[str, SavedState]]:
        """Read for at most one slice; return the partitions now complete."""
        done: dict[int, dict[str, SavedState]] = {}
        for partition, into, seconds in self.reads.step():
            done[partition] = into.states
            self._left[partition] = FollowersLeft(into.others, frozenset(into.following))
            self.metrics.restore.observe(seconds)
            self.metrics.states_restored.inc(len(into.states))
        return done


def adopt(
    store: StateStore,
    model_id: str,
    partition: int,
    states: dict[str, SavedState],
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
            store.mark_changed(partition, key)
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
