"""The run loop: the only place where Kafka I/O, state and the engine meet.

poll -> (restore newly assigned partitions first) -> process (decode, state,
engine) -> checkpoint (outputs, state records, offsets; see checkpointing.py)
-> poll again. Nothing is committed before its outputs and states are durable in
Kafka, so a crash anywhere repeats work and never skips it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import AuthorizationError, KafkaError

from daemon.config import Settings
from daemon.core.processor import OutputRecord, Processor
from daemon.core.state import Eviction, SequenceState
from daemon.kafka.acl import authorization_failure
from daemon.kafka.clients import make_consumer, make_producer, make_restore_consumer, wait_for_cluster
from daemon.kafka.listener import RebalanceEvents
from daemon.kafka.topics import ensure_topics
from daemon.ops.health import Health
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery import (
    Checkpoint,
    Checkpointer,
    DeliveryFailed,
    StateRecord,
    TransactionFailed,
)
from daemon.streaming.restore import Restorer

log = get_logger(__name__)

# Short enough that SIGTERM and rebalances are noticed promptly, long enough
# that an idle daemon does not spin.
POLL_TIMEOUT_MS = 200
# Lag and idle eviction are housekeeping: at most once a second.
HOUSEKEEPING_INTERVAL_S = 1.0


class RunLoop:
    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        metrics: Metrics,
        health: Health,
        stop: threading.Event,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """`on_batch(n)` is called after each poll batch of n > 0 inputs is processed and
        its outputs handed to delivery: a hook for measurements (`lstmd bench`)."""
        self.settings = settings
        self.on_batch = on_batch
        self.processor = processor
        self.store = processor.store
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self._next_offset: dict[int, int] = {}
        self._housekeeping_at = 0.0
        self._pending: list[OutputRecord] = []  # announcements waiting for the next checkpoint
        self._tombstones: list[StateRecord] = []
        self._uncommitted: dict[TopicPartition, int] = {}  # processed, not yet checkpointed
        self._checkpointed_at = time.monotonic()

    def run(self) -> None:
        """Serve until `stop` is set; returns after a clean checkpoint and close."""
        admin = wait_for_cluster(self.settings, self.stop, self.health.beat)
        if admin is None:
            return
        try:
            partitions = ensure_topics(admin, self.settings)
        finally:
            admin.close()
        log.info("kafka_ready", input_topic=self.settings.input_topic, partitions=partitions,
                 state_topic=self.settings.state_topic_name, delivery=self.settings.delivery)
        transactional_id = self._transactional_id()
        try:  # first: it may wait for Kafka, and then nothing else is open yet
            checkpointer = Checkpointer(
                self.settings, lambda: make_producer(self.settings, transactional_id),
                self.metrics, self.stop)
        except DeliveryFailed:  # asked to stop meanwhile
            return
        consumer = make_consumer(self.settings)
        restorer = Restorer(make_restore_consumer(self.settings), self.settings.state_topic_name,
                            self.metrics)
        listener = RebalanceEvents()
        self._await_metadata(consumer)
        consumer.subscribe([self.settings.input_topic], listener=listener)
        self.health.reason = "waiting for the group to assign partitions"
        try:
            while not self.stop.is_set():
                try:
                    polled = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
                except AuthorizationError as exc:  # a group or topic ACL: retrying cannot help
                    raise authorization_failure(self.settings, exc) from None
                self.health.beat()
                self.metrics.last_poll.set_to_current_time()
                self._apply_rebalance(consumer, listener, restorer)
                if restorer.active:
                    self._restore(restorer)
                batch = self._accept(consumer, polled)
                self._checkpoint(consumer, checkpointer, restorer, batch)
                if batch and self.on_batch is not None:
                    self.on_batch(len(batch))
                self._housekeeping(consumer)
                if self._pending:
                    # Idle evictions: durable before any later input of those keys is
                    # answered, so a restart cannot revive a state already announced gone.
                    self._checkpoint(consumer, checkpointer, restorer, [], force=True)
            log.info("stopping", reason="signal")
            self._checkpoint(consumer, checkpointer, restorer, [], force=True)
        finally:
            consumer.close(autocommit=False)
            restorer.consumer.close()
            checkpointer.close(timeout=30)
            log.info("kafka_closed")

    def _await_metadata(self, consumer: KafkaConsumer, timeout_s: float = 30.0) -> None:
        """Have the input topic's partitions in the consumer's metadata before joining.

        kafka-python 3.0.12 can join a new group before it knows the topic's
        partitions ("No partition metadata for topic"): the leader then assigns
        nothing and was seen not to rejoin for minutes.
        """
        deadline = time.monotonic() + timeout_s
        while not consumer.partitions_for_topic(self.settings.input_topic):
            if time.monotonic() > deadline or self.stop.wait(0.2):
                log.warning("input_metadata_missing", topic=self.settings.input_topic)
                return
            self.health.beat()

    def _transactional_id(self) -> str | None:
        """Stable for a static member (its restart fences its own zombie), unique otherwise;
        KIP-447 fences zombies through the group generation either way."""
        if self.settings.delivery != "exactly-once":
            return None
        member = self.settings.group_instance_id or f"{socket.gethostname()}-{os.getpid()}-" \
            f"{uuid.uuid4().hex[:8]}"
        return f"lstmd-{self.settings.group_id}-{member}"

    # -- rebalances and restore --------------------------------------------------
    def _apply_rebalance(self, consumer: KafkaConsumer, listener: RebalanceEvents,
                         restorer: Restorer) -> None:
        assigned, revoked, lost = listener.take()
        if not (assigned or revoked or lost):
            return
        for kind, tps in (("revoked", revoked), ("lost", lost)):
            for tp in tps:
                self._release(tp, restorer, kind)
            if tps:
                self.metrics.rebalances.labels(kind=kind).inc()
        now_assigned = consumer.assignment()
        if assigned:
            self.metrics.rebalances.labels(kind="assigned").inc()
            log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))
            # Assigned and revoked again within the same poll: nothing to restore.
            self._start_restore(restorer, assigned & now_assigned)
        self.metrics.assigned.set(len(now_assigned))
        self.health.assigned = bool(now_assigned)

    def _release(self, tp: TopicPartition, restorer: Restorer, kind: str) -> None:
        # Everything polled so far is checkpointed: dropping the state is all that
        # is left. On loss nothing more may be committed anyway.
        restorer.cancel([tp.partition])
        self.health.restoring.discard(tp.partition)
        dropped = self.store.drop_partition(tp.partition)
        self._next_offset.pop(tp.partition, None)
        self._uncommitted.pop(tp, None)
        self._tombstones = [t for t in self._tombstones if t.partition != tp.partition]
        with contextlib.suppress(KeyError):  # no lag reported for it yet
            self.metrics.lag.remove(str(tp.partition))
        log.info("partition_released", kind=kind, partition=tp.partition, states_dropped=dropped)

    def _start_restore(self, restorer: Restorer, tps: set[TopicPartition]) -> None:
        """Records polled from a partition while it restores are handed back (see
        `_accept`). Not `pause()`: kafka-python 3.0.12 parks data fetched for a
        paused partition and, with other partitions busy, was seen never to
        deliver that partition again after `resume()`."""
        for tp in tps:
            self.store.drop_partition(tp.partition)
            self.health.restoring.add(tp.partition)
        try:
            restorer.begin(tp.partition for tp in tps)
        except AuthorizationError as exc:  # no Describe/Read on the state topic: permanent
            raise authorization_failure(self.settings, exc, self.settings.state_topic_name) from None

    def _restore(self, restorer: Restorer) -> None:
        try:
            restored = restorer.step()
        except AuthorizationError as exc:  # Read on the state topic revoked: permanent
            raise authorization_failure(self.settings, exc, self.settings.state_topic_name) from None
        for partition, states in restored.items():
            evicted = self._install(partition, states)
            self._pending += self.processor.announce(evicted)
            self.health.restoring.discard(partition)
            log.info("partition_restored", partition=partition, states=len(states),
                     discarded=len(evicted))
        self.metrics.active_sequences.set(len(self.store))

    def _install(self, partition: int, states: dict[str, tuple[SequenceState, str]]) -> list[Eviction]:
        """A state saved under another model is never applied to this one: it is
        dropped (its watermark kept) and announced, and the sequence starts over."""
        evicted = []
        # Oldest watermark first: the order the keys were last used in, so the
        # least recently used state is evicted first after a restore too.
        for key, (state, model_id) in sorted(states.items(), key=lambda kv: kv[1][0].watermark):
            if model_id != self.processor.model_id and state.n:
                evicted.append(Eviction(partition, key, "model_changed", state.n, state.watermark))
                state = SequenceState(watermark=state.watermark)
                self.store.touched(partition, key)
            self.store.install(partition, key, state)
        return evicted

    def _accept(self, consumer: KafkaConsumer, polled: dict[TopicPartition, list[Any]]) -> list[Any]:
        """The polled records ready to process, partitions in order. Records of a
        partition still restoring are given back: the consumer is rewound to the
        first of them."""
        batch: list[Any] = []
        for tp in sorted(polled, key=lambda t: t.partition):
            records = polled[tp]
            if not records:
                continue
            if tp.partition in self.health.restoring:
                consumer.seek(tp, records[0].offset)
                continue
            batch.extend(records)
        return batch

    # -- checkpoints --------------------------------------------------------------
    def _checkpoint(self, consumer: KafkaConsumer, checkpointer: Checkpointer, restorer: Restorer,
                    batch: list[Any], *, force: bool = False) -> None:
        """Publish the batch's outputs; every checkpoint interval (at-least-once) or
        every batch (exactly-once), also the changed states and the offsets.

        Between two checkpoints the published outputs are ahead of the committed
        offsets and states: a crash repeats them, identically, from the last
        checkpoint. A revoked partition's uncheckpointed work is simply dropped
        (see `_release`): its next owner recomputes it from the same checkpoint.
        """
        outputs = self._pending + self.processor.process(batch)
        self._pending = []
        for rec in batch:
            self._uncommitted[TopicPartition(rec.topic, rec.partition)] = rec.offset + 1
            self._next_offset[rec.partition] = rec.offset + 1
        now = time.monotonic()
        # An eviction (announced among the outputs) is checkpointed at once: a
        # restart must not revive a state whose end was already published.
        due = force or checkpointer.transactional or any(o.announcement for o in outputs) or (
            now - self._checkpointed_at >= self.settings.checkpoint_interval_ms / 1000)
        if not due:
            if outputs:
                checkpointer.commit(consumer, Checkpoint(outputs=outputs))
            return
        if not (outputs or self._uncommitted or self._tombstones or self.store.has_changes()):
            return
        cp = Checkpoint(outputs=outputs, states=self._tombstones, offsets=self._uncommitted)
        cp.states += [StateRecord(p, k, v) for p, k, v in self.store.take_changes(
            self.processor.model_id)]
        self._tombstones, self._uncommitted = [], {}
        self._checkpointed_at = now
        try:
            committed = checkpointer.commit(consumer, cp)
        except TransactionFailed:
            self._recover(consumer, restorer)
            return
        if not committed:
            # Kept for the next checkpoint; `_release` drops those of partitions revoked.
            self._uncommitted = cp.offsets | self._uncommitted
            return
        for tp, offset in cp.offsets.items():
            # Resets now committed no longer need their watermark: delete them.
            self._tombstones += [StateRecord(tp.partition, key, None)
                                 for key in self.store.committed(tp.partition, offset)]

    def _recover(self, consumer: KafkaConsumer, restorer: Restorer) -> None:
        """After an aborted transaction the states in memory include work that was
        never committed: forget them, rewind to the committed offsets, restore."""
        assigned = set(consumer.assignment())
        for tp in assigned:
            committed = consumer.committed(tp)
            if committed is not None:
                consumer.seek(tp, committed)
            else:
                consumer.seek_to_beginning(tp)
        restorer.cancel(list(restorer.active))
        self._uncommitted, self._tombstones = {}, []
        self._start_restore(restorer, assigned)
        log.warning("recovering_from_abort", partitions=sorted(tp.partition for tp in assigned))

    # -- housekeeping -------------------------------------------------------------
    def _housekeeping(self, consumer: KafkaConsumer) -> None:
        now = time.monotonic()
        if now - self._housekeeping_at < HOUSEKEEPING_INTERVAL_S:
            return
        self._housekeeping_at = now
        if self.settings.sequence_idle_timeout_s:
            self._pending += self.processor.evict_idle(self.settings.sequence_idle_timeout_s)
        self.metrics.state_bytes.set(self.store.state_bytes())
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            position = self._next_offset.get(tp.partition)
            if high is None:
                continue
            if position is None:
                try:
                    position = consumer.position(tp, timeout_ms=100)
                except KafkaError:
                    continue
            if position is not None:
                self.metrics.lag.labels(partition=str(tp.partition)).set(max(0, high - position))
