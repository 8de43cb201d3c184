"""The checkpoint policy: when a checkpoint is due, what it carries, what follows it.

Between two checkpoints the run loop publishes each poll batch's outputs
(at-least-once) while the inputs' offsets, the changed states and the eviction
notices wait here. A checkpoint is due

* every poll batch in exactly-once delivery (each batch is one transaction);
* when an eviction notice is among the outputs: a restart must not revive a
  state whose end was already published, so its reset record and the offsets
  go at once;
* when the checkpoint interval (`LSTMD_CHECKPOINT_INTERVAL_MS`) has passed;
* when forced (a flush: idle evictions, shutdown).

In exactly-once delivery every checkpoint carries the committed offsets of every
owned partition, new or not: the broker then checks the group generation of
each transaction, so a member expelled meanwhile commits nothing (KIP-447).

`take` builds the checkpoint and `did` applies its outcome: committed offsets
let the watermarks of ended sequences go (tombstones in the next checkpoint);
offsets the group would not take (a rebalance) are kept for the next one,
unless their partition is released meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from daemon.core.records import InputRecord, OutputRecord, StateRecord
from daemon.core.state import StateStore
from daemon.kafka.port import TopicPartition


@dataclass
class Checkpoint:
    """What one checkpoint makes durable, in this order: outputs, states, offsets."""

    outputs: list[OutputRecord] = field(default_factory=list)
    states: list[StateRecord] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # next offset to read


def merged(cps: Sequence[Checkpoint | None]) -> Checkpoint | None:
    """The checkpoints as one, in order; None if there is none: what a synchronous
    checkpoint makes durable of those still pending. A later offset of a partition
    wins, and so does a later state record of a sequence (its newest state, or its
    tombstone, is all a restart needs: the older ones need not be written)."""
    present = [cp for cp in cps if cp is not None]
    if len(present) <= 1:
        return present[0] if present else None
    out = Checkpoint()
    newest: dict[tuple[int, bytes], StateRecord] = {}
    for cp in present:
        out.outputs += cp.outputs
        out.offsets.update(cp.offsets)
        for state in cp.states:
            newest.pop((state.partition, state.wire_key), None)  # re-inserted last: its newest place
            newest[state.partition, state.wire_key] = state
    out.states = list(newest.values())
    return out


class Changes(Protocol):
    """State records a checkpoint carries besides the serving store's."""

    def has_changes(self) -> bool: ...
    def take_changes(self) -> list[StateRecord]: ...
    def committed(self, partition: int, offset: int) -> list[StateRecord]:
        """Offsets below `offset` of the partition are committed: the tombstones of the
        ended sequences no longer needed (`StateStore.forget_ended_before`)."""
        ...


class CheckpointPolicy:
    def __init__(
        self,
        store: StateStore,
        model_id: str,
        *,
        interval_s: float,
        every_batch: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.model_id = model_id
        self.interval_s = interval_s
        self.every_batch = every_batch
        self.clock = clock
        self.offsets: dict[TopicPartition, int] = {}  # processed, not yet committed
        # The committed position of every owned partition, as far as known (read when
        # it was assigned, then each commit): exactly-once sends them with every
        # transaction, so even one without new offsets is fenced by the group.
        self.committed: dict[TopicPartition, int] = {}
        self.tombstones: list[StateRecord] = []
        self.notices: list[OutputRecord] = []  # not yet published
        # The state records of the models beside the serving one (daemon/streaming/follow.py):
        # in the same checkpoint as the serving model's, so a restore finds them consistent.
        self.others: Changes | None = None
        self._at = clock()

    def processed(self, batch: Sequence[InputRecord]) -> dict[int, int]:
        """The batch's inputs are applied: their offsets wait for the next checkpoint.
        Returns {partition: next offset to read} of the batch's partitions."""
        last = {(rec.topic, rec.partition): rec.offset for rec in batch}  # in order: the last wins
        ends = {}
        for (topic, partition), offset in last.items():
            self.offsets[TopicPartition(topic, partition)] = ends[partition] = offset + 1
        return ends

    def assigned(self, tp: TopicPartition, position: int) -> None:
        """The partition's committed position, read (stable) before its restore: the
        store may forget its restored ended sequences below it (`StateStore.committed`)."""
        self.committed[tp] = position
        self.tombstones += [
            StateRecord(tp.partition, k, None) for k in self.store.forget_ended_before(tp.partition, position)
        ]

    def notify(self, notices: Sequence[OutputRecord]) -> None:
        """Eviction notices made outside a batch (restore, idle eviction)."""
        self.notices += notices

    def take_notices(self) -> list[OutputRecord]:
        notices, self.notices = self.notices, []
        return notices

    def due(self, outputs: Sequence[OutputRecord], *, force: bool = False) -> bool:
        return (
            force
            or self.every_batch
            or any(o.notice for o in outputs)
            or self.clock() - self._at >= self.interval_s
        )

    def next_checkpoint(self, outputs: list[OutputRecord]) -> Checkpoint | None:
        """The checkpoint of everything pending, with `outputs`; None if there is nothing."""
        if not (outputs or self.offsets or self.tombstones or self._changes()):
            return None
        offsets = (self.committed | self.offsets) if self.every_batch else self.offsets
        cp = Checkpoint(outputs=outputs, states=self.tombstones, offsets=offsets)
        cp.states += [StateRecord(p, k, v) for p, k, v in self.store.take_changes(self.model_id)]
        if self.others is not None:
            cp.states += self.others.take_changes()
        self.tombstones, self.offsets = [], {}
        self._at = self.clock()
        return cp

    def checkpointed(self, cp: Checkpoint, committed: bool) -> None:
        """Apply the outcome of `cp`: committed, or its offsets refused by the group."""
        if not committed:
            # Kept for the next checkpoint; `release` drops those of partitions revoked.
            self.offsets = cp.offsets | self.offsets
            return
        self.committed.update(cp.offsets)
        for tp, offset in cp.offsets.items():
            # Resets now committed no longer need their watermark: delete them.
            self.tombstones += [
                StateRecord(tp.partition, key, None)
                for key in self.store.forget_ended_before(tp.partition, offset)
            ]
            if self.others is not None:
                self.tombstones += self.others.committed(tp.partition, offset)

    def release(self, tp: TopicPartition) -> None:
        """The partition is gone: its next owner recomputes its pending work."""
        self.offsets.pop(tp, None)
        self.committed.pop(tp, None)
        self.tombstones = [t for t in self.tombstones if t.partition != tp.partition]

    def pending(self) -> bool:
        """Anything not yet durable: offsets, notices, tombstones, changed states."""
        return bool(self.offsets or self.notices or self.tombstones or self._changes())

    def _changes(self) -> bool:
        return self.store.has_changes() or (self.others is not None and self.others.has_changes())

    def uncommitted(self) -> dict[int, tuple[int | None, int]]:
        """{partition: (committed position if known, next offset processed)} of the
        work a partition's next owner will repeat."""
        return {
            tp.partition: (self.committed.get(tp), o)
            for tp, o in sorted(self.offsets.items())
            if self.committed.get(tp) != o
        }

    def clear(self) -> None:
        """After an aborted transaction: what was pending is recomputed from the last commit."""
        self.offsets, self.tombstones = {}, []
