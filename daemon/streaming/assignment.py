"""The partitions this member owns, moved through their lifecycle (lifecycle.py):
assigned -> a stable committed position -> restored from the state topic -> (after a
model change) rebuilt -> serving; released when revoked or lost; rewound to the
committed offsets after an abort.

Kept apart from the loop because this is where a partition's state comes and
goes: every rule about what is dropped, restored or recomputed lives here, and the
loop only says when (after each poll).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.records import InputRecord, StateRecord
from daemon.core.state import SavedState, StateStore, model_tag
from daemon.kafka.acl import authorization_failure
from daemon.kafka.errors import AuthorizationError, KafkaError
from daemon.kafka.port import Polled, TopicPartition
from daemon.kafka.retry import Backoff
from daemon.ops.health import Health
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery import DeliveryFailed, TransactionFailed
from daemon.streaming.follow import Followers
from daemon.streaming.layout import TopicWatch
from daemon.streaming.lifecycle import Partitions, Phase
from daemon.streaming.policy import CheckpointPolicy
from daemon.streaming.restore import adopt
from daemon.streaming.startup import Clients

log = get_logger("daemon.streaming.loop")

# One wait for a newly assigned partition's committed position (asked again at the
# next poll while it is not stable or Kafka does not answer).
POSITION_TIMEOUT_MS = 200
# One wait for a committed offset after an abort (the loop waits for it anyway).
COMMITTED_TIMEOUT_MS = 5000


@dataclass
class Assignment:
    """The run's owned partitions and what is done to them after each poll. `flush`
    checkpoints everything pending (a rebuilt partition is checkpointed before it
    serves); `abandon` ends the retries of a rewind at the shutdown deadline."""

    settings: Settings
    processor: Processor
    metrics: Metrics
    health: Health
    partitions: Partitions
    policy: CheckpointPolicy
    topics: TopicWatch
    clients: Clients
    flush: Callable[[], None]
    abandon: threading.Event
    # The models beside the serving one (daemon/streaming/follow.py).
    followers: Followers | None = None
    # How many times the loop rewound to the committed offsets (`recover`).
    rewinds: int = field(default=0)

    @property
    def store(self) -> StateStore:
        return self.processor.store

    # -- after each poll ------------------------------------------------------------
    def apply_rebalance(self, failure: Exception | None) -> bool:
        """Apply the changes the listener collected, and the failure of a revocation
        checkpoint if there was one; True if the loop was rewound to the committed
        offsets, so what was polled with them is to be dropped."""
        clients = self.clients
        assigned, revoked, lost = clients.listener.take()
        if not (assigned or revoked or lost or failure):
            return False
        for kind, tps in (("revoked", revoked), ("lost", lost)):
            for tp in tps:
                self.release(tp, kind)
            if tps:
                self.metrics.rebalances.labels(kind=kind).inc()
        now_assigned = clients.consumer.assignment()
        if assigned:
            self.metrics.rebalances.labels(kind="assigned").inc()
            log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))
            # Assigned and revoked again within the same poll: nothing to restore.
            self._start_restore(assigned & now_assigned)
        self.metrics.assigned.set(len(now_assigned))
        if failure is None:
            return False
        if not isinstance(failure, (DeliveryFailed, TransactionFailed)) or self.abandon.is_set():
            raise failure  # an ACL refused, the shutdown deadline: as from the loop's own checkpoint
        # What it had taken may be half-written: recomputed from the last commit.
        clients.delivery.restart()
        self.recover()
        return True

    def release(self, tp: TopicPartition, kind: str) -> None:
        """A revoked partition's work was checkpointed in the revocation callback
        (checkpoints.py); a lost one's may not be committed any more. Either way
        dropping the state, the pending offsets and any resend of its outputs is all
        that is left; the next owner goes on from the last checkpoint (and a rebuild
        under way, from the old model's states)."""
        clients = self.clients
        clients.restorer.cancel([tp.partition])
        clients.rebuilder.cancel([tp.partition])
        clients.delivery.release(tp.partition)
        if self.followers:
            self.followers.release([tp.partition])
        self.partitions.release(tp.partition)
        self.policy.release(tp)
        dropped = self.store.drop_partition(tp.partition)
        with contextlib.suppress(KeyError):  # no lag reported for it yet
            self.metrics.lag.remove(str(tp.partition))
        log.info("partition_released", kind=kind, partition=tp.partition, states_dropped=dropped)

    def _start_restore(self, tps: set[TopicPartition]) -> None:
        """Records polled from a partition before it serves are handed back (see
        `accept`). Not `pause()`: kafka-python 3.0.12 parks data fetched for a
        paused partition and, with other partitions busy, was seen never to
        deliver that partition again after `resume()`."""
        for tp in tps:
            self.store.drop_partition(tp.partition)
        if self.followers:
            self.followers.release([tp.partition for tp in tps])
        self.partitions.assign(tp.partition for tp in tps)

    def catch_up(self) -> None:
        """Move assigned partitions on: a stable committed position first, then their
        states from the state topic; a partition restored serves, unless its open
        sequences of another model are rebuilt first (`_rebuild`)."""
        clients = self.clients
        self._read_positions()
        if clients.restorer.active:
            for partition, states in clients.restorer.step().items():
                self._adopt(partition, states)
        if clients.rebuilder.active:
            self._rebuild()
        self.metrics.active_sequences.set(len(self.store))

    def accept(self, polled: Polled) -> list[InputRecord]:
        """The polled records ready to process, partitions in order. Records of a
        partition still restoring are given back: the consumer is rewound to the
        first of them."""
        batch: list[Any] = []
        for tp in sorted(polled, key=lambda t: t.partition):
            records = polled[tp]
            if not records:
                continue
            phase = self.partitions.phase(tp.partition)
            if phase is Phase.ACTIVE:
                batch.extend(records)
            elif phase is not None:  # assigned or restoring: not yet
                self.clients.consumer.seek(tp, records[0].offset)
            # else: released within this poll; its next owner reads these records
        return batch

    def hand_back(self, batch: list[InputRecord]) -> None:
        """Give a whole accepted batch back to the consumer, unprocessed: each partition
        is rewound to its first record in it (read again at a later poll)."""
        first: dict[TopicPartition, int] = {}
        for rec in batch:
            tp = TopicPartition(rec.topic, rec.partition)
            first[tp] = min(first.get(tp, rec.offset), rec.offset)
        for tp, offset in sorted(first.items()):
            self.clients.consumer.seek(tp, offset)

    # -- restore and rebuild ----------------------------------------------------------
    def _read_positions(self) -> None:
        """The committed position of each newly assigned partition, once it is stable.

        The consumer reads committed (KIP-447: a transaction still open on the
        partition's offsets makes the broker answer "unstable", and the client waits).
        Only then is the state partition's end read: a transaction committed by the
        previous owner is then on it, its states and its offsets together.
        """
        clients = self.clients
        for p in self.partitions.in_phase(Phase.ASSIGNED):
            if self.topics.stateless(clients.delivery, p):
                continue
            tp = TopicPartition(self.settings.input_topic, p)
            try:  # asked again at the next poll while Kafka does not answer
                committed = self._committed(tp, POSITION_TIMEOUT_MS)
            except KafkaError as exc:
                log.info("position_waiting", partition=p, error=str(exc))
                continue
            if committed is not None:
                self.policy.assigned(tp, committed)
            self.partitions.begin_restore(p)
            clients.restorer.begin([p])

    def _adopt(self, partition: int, states: dict[str, SavedState]) -> None:
        """Install a restored partition's states and serve it, or rebuild it first; the
        models beside the serving one take theirs (they build once it serves)."""
        rebuilder = self.clients.rebuilder
        left = self.clients.restorer.followers_left(partition)
        own = model_tag(self.processor.model_id)
        promoted = own in left.following and own in left.states
        if promoted:  # the previous owner was promoting this model: its states are exact
            states = self._promoted(partition, states, left.states.pop(own))
        if self.followers is not None:  # with none, what others left is deleted
            self.followers.restored(partition, left.states, left.following - {own})
        if self.settings.on_model_change == "rebuild" and rebuilder.begin(partition, states):
            self.partitions.begin_rebuild(partition)
            log.info(
                "partition_rebuilding",
                partition=partition,
                states=len(states),
                other_model=len(rebuilder.active[partition].saved),
            )
            return
        evicted = adopt(self.store, self.processor.model_id, partition, states, self.processor.state_shapes)
        self.policy.notify(self.processor.announce(evicted))
        if promoted:
            self.store.mark_partition(partition)  # rewritten under the serving keys
        self.partitions.restored(partition)
        log.info("partition_restored", partition=partition, states=len(states), discarded=len(evicted))

    def _promoted(
        self, partition: int, states: dict[str, SavedState], candidate: dict[str, SavedState]
    ) -> dict[str, SavedState]:
        """A partition whose previous owner was promoting this model (a candidate that
        followed it, daemon/streaming/promote.py) and stopped before the switch: the
        candidate's states, exact, serve; its records are deleted and its states
        rewritten under the serving keys. A sequence it could not replay starts over."""
        own = model_tag(self.processor.model_id)
        self.policy.tombstones += [StateRecord(partition, k, None, owner=own) for k in sorted(candidate)]
        self.policy.tombstones.append(StateRecord(partition, "", None, owner=own, following=True))
        merged = dict(states)
        for key, (state, saved_by) in candidate.items():
            if not state.exact:  # the old model's record stays: announced as changed, or rebuilt
                continue
            merged[key] = SavedState(state, saved_by)
        log.info(
            "partition_promoted", partition=partition, model=self.processor.model_id, states=len(candidate)
        )
        return merged

    def _rebuild(self) -> None:
        """Move rebuilds on; a partition rebuilt gets its states installed, its
        dropped sequences announced, and all of it checkpointed before it serves:
        its next owner then restores this model's states, not the old ones."""
        ready = []
        for done in self.clients.rebuilder.step():
            p = done.partition
            evicted = adopt(self.store, self.processor.model_id, p, done.states, self.processor.state_shapes)
            for key in done.changed:
                self.store.mark_changed(p, key)
            self.policy.notify(self.processor.announce(done.evictions + evicted))
            ready.append(p)
            log.info(
                "partition_rebuilt",
                partition=p,
                states=len(done.states),
                rebuilt=done.rebuilt,
                dropped=dict(Counter(ev.cause for ev in done.evictions)),  # each is announced
                events_read=done.read,
                events_replayed=done.replayed,
                seconds=round(done.seconds, 3),
            )
        if ready:
            self.flush()
            for p in ready:
                self.partitions.rebuilt(p)  # not if the checkpoint aborted: restored again

    # -- rewinding ------------------------------------------------------------------
    def recover(self) -> None:
        """After an aborted transaction the states in memory include work that was
        never committed: forget them, rewind to the committed offsets, restore."""
        self.rewinds += 1
        clients = self.clients
        consumer = clients.consumer
        assigned = set(consumer.assignment())
        # Not serving from here on, before any call that may fail: a shutdown deadline
        # passed while a committed offset is unknown (a broker away) names these
        # partitions as the ones their next owner repeats.
        self._start_restore(assigned)
        # Rewound before the next poll (as the consumer's own fetches expect), each
        # committed offset read with a bound and retried until the shutdown deadline.
        for tp in sorted(assigned):
            committed = self._committed(tp, retry=Backoff(self.abandon, beat=self.health.beat))
            if committed is not None:
                consumer.seek(tp, committed)
            else:
                consumer.seek_to_beginning(tp)
        clients.restorer.cancel(list(clients.restorer.active))
        clients.rebuilder.cancel(list(clients.rebuilder.active))
        self.policy.clear()
        log.warning("recovering_from_abort", partitions=sorted(tp.partition for tp in assigned))

    def _committed(
        self, tp: TopicPartition, timeout_ms: int = COMMITTED_TIMEOUT_MS, retry: Backoff | None = None
    ) -> int | None:
        """The partition's committed offset (None: none yet). A missing ACL ends the
        daemon; another Kafka error is retried with `retry` until the shutdown
        deadline, or raised if there is none (the caller asks again later)."""
        while True:
            try:
                committed: int | None = self.clients.consumer.committed(tp, timeout_ms=timeout_ms)
                return committed
            except AuthorizationError as exc:
                raise authorization_failure(self.settings, exc) from None
            except KafkaError as exc:
                if retry is None:
                    raise
                log.warning(
                    "position_waiting", partition=tp.partition, error=str(exc), retry_in_s=retry.delay
                )
                if retry.wait():
                    raise DeliveryFailed(
                        f"committed offset of partition {tp.partition} unknown at shutdown"
                    ) from exc
