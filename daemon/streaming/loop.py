"""The run loop: the only place where Kafka I/O, state and the engine meet.

poll -> apply the rebalance (partition lifecycle, lifecycle.py) -> restore newly
assigned partitions (restore.py; after a model change, rebuild their open
sequences by replaying their inputs: rebuild.py) -> process the active partitions' records
(the core processor) -> checkpoint when the policy says so (policy.py; made
durable by delivery.py) -> poll again. Nothing is committed before its outputs
and states are durable in Kafka, so a crash anywhere repeats work and never
skips it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import AuthorizationError, FencedInstanceIdError, KafkaError

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.records import OutputRecord
from daemon.core.state import SavedState, snapshot_bytes
from daemon.kafka.acl import authorization_failure, fenced_instance
from daemon.kafka.clients import (
    make_consumer,
    make_producer,
    make_restore_consumer,
    partitions_for_topic,
    wait_for_cluster,
)
from daemon.kafka.listener import RebalanceEvents
from daemon.kafka.retry import Backoff
from daemon.kafka.topics import (
    Layout,
    check_state_record_size,
    ensure_topics,
    known_layout,
    moved_sequences,
    outputs_aligned,
    refresh_metadata,
)
from daemon.ops.health import Health
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery import Delivery, DeliveryFailed, TransactionFailed, make_delivery
from daemon.streaming.lifecycle import Partitions, Phase
from daemon.streaming.policy import CheckpointPolicy
from daemon.streaming.rebuild import Rebuilder
from daemon.streaming.restore import Restorer, adopt

log = get_logger(__name__)

# Short enough that SIGTERM and rebalances are noticed promptly, long enough
# that an idle daemon does not spin.
POLL_TIMEOUT_MS = 200
# After a poll that failed for a retriable reason (the broker away), the pause before
# the next: short, since the loop's other work waits too, yet no spin.
POLL_RETRY_S = 0.5
# Lag and idle eviction are housekeeping: at most once a second.
HOUSEKEEPING_INTERVAL_S = 1.0
# One wait for the ends of paused partitions (their lag), at most once a housekeeping.
LAG_END_OFFSETS_TIMEOUT_MS = 200
# One wait for a newly assigned partition's committed position (asked again at the
# next poll while it is not stable or Kafka does not answer).
POSITION_TIMEOUT_MS = 200
# One wait for a committed offset after an abort (the loop waits for it anyway).
COMMITTED_TIMEOUT_MS = 5000
# The checkpoint made inside a revocation callback holds kafka-python's IO thread
# (heartbeats wait): it gives up after this share of the session timeout, and the
# loop then rewinds to the committed offsets (a repeat, never a loss).
REVOCATION_SESSION_SHARE = 0.5
# Of the shutdown budget, what is kept for a producer bootstrap already under way
# (BOOTSTRAP_TIMEOUT_MS) and for closing the clients: retries give up before it.
SHUTDOWN_RESERVE_S = 7.0
# The most closing the group's consumer may wait for its coordinator (leaving the group).
CONSUMER_CLOSE_TIMEOUT_S = 3.0


@dataclass
class Clients:
    """The Kafka side of one run: opened by `run` (or a test, on another Kafka), handed
    to `RunLoop.start`, closed by `RunLoop.close`."""

    consumer: KafkaConsumer
    checkpointer: Delivery
    restorer: Restorer
    rebuilder: Rebuilder
    listener: RebalanceEvents


def transactional_id(settings: Settings) -> str | None:
    """Stable for a static member (its restart fences its own zombie), unique otherwise;
    KIP-447 fences zombies through the group generation either way."""
    if settings.delivery != "exactly-once":
        return None
    member = settings.group_instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return f"lstmd-{settings.group_id}-{member}"


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
        self.processor = processor
        self.store = processor.store
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self.on_batch = on_batch
        self.partitions = Partitions()
        health.watch(self.partitions)
        # Set when the shutdown deadline passes: every retry in hand gives up then.
        self.abandon = threading.Event()
        self._deadline: float | None = None
        self.policy = CheckpointPolicy(
            self.store,
            processor.model_id,
            interval_s=settings.checkpoint_interval_ms / 1000,
            every_batch=settings.delivery == "exactly-once",
        )
        self._housekeeping_at = 0.0
        self._throttled = False
        # A revocation checkpoint that failed on kafka-python's IO thread, for the
        # loop's thread to act on after poll returns (see `_before_revoke`).
        self._revocation_failure: Exception | None = None
        # Set before the consumer closes: its close revokes, nothing is left to save.
        self._closing = False
        # How many times the loop rewound to the committed offsets (`_recover`).
        self._rewinds = 0
        # The topics' partition counts last seen (`_watch_topics`), the input's count
        # announced, and the input partitions held for want of a state partition.
        self._layout: Layout | None = None
        self._input_partitions = 0
        self._held: set[int] = set()
        # The Kafka side of the run, from `start` on.
        self._clients: Clients | None = None
        # The rewinds counted when the shutdown phase began (None before it).
        self._stopping_at_rewinds: int | None = None
        for kind in ("assigned", "revoked", "lost"):  # every label value starts at 0
            metrics.rebalances.labels(kind=kind)

    def run(self) -> None:
        """Serve until `stop` is set; returns after a clean checkpoint and close."""
        threading.Thread(target=self._watch_shutdown, name="lstmd-shutdown-deadline", daemon=True).start()
        clients = self.connect()
        if clients is None:
            return
        self.start(clients)
        try:
            while self.step():
                pass
        except DeliveryFailed as exc:
            # The shutdown deadline passed with work in hand. Nothing is lost: no
            # offset was committed past an output or state not yet durable.
            log.warning(
                "shutdown_incomplete",
                reason=str(exc),
                repeated_by_next_owner={
                    str(p): {"committed": c, "processed_to": o}
                    for p, (c, o) in self.policy.uncommitted().items()
                },
                message="the next owner of these partitions repeats their inputs from the committed offsets",
            )
        finally:
            self.close()

    def start(self, clients: Clients) -> None:
        """Take the clients of this run and join the group: `step` may be called from now on."""
        self._clients = clients
        self._watch_topics(clients)  # the partition counts, before any is assigned
        if self.settings.delivery == "at-least-once":
            # Exactly-once commits every poll batch in its transaction before the next
            # poll: a revocation finds nothing in hand.
            clients.listener.before_revoke = functools.partial(self._before_revoke, clients)
        clients.consumer.subscribe([self.settings.input_topic], listener=clients.listener)  # type: ignore[arg-type]  # stubs predate the async listener
        self.health.reason = "waiting for the group to assign partitions"

    @property
    def clients(self) -> Clients:
        """The Kafka side of the run (from `start` on)."""
        assert self._clients is not None, "start() first"
        return self._clients

    def step(self) -> bool:
        """One iteration of the loop; False once it has shut down.

        poll -> apply the rebalance -> restore and rebuild -> process -> checkpoint
        when due -> housekeeping. From `stop` on, each step is one of the shutdown
        phase (`_shutdown_step`), until its final checkpoint is committed or given up.
        """
        clients = self.clients
        if self.stop.is_set():
            return self._shutdown_step(clients)
        self._throttle(clients)
        polled = self._poll(clients.consumer)
        if self._apply_rebalance(clients):
            polled = {}  # rewound to the committed offsets: polled again
        self._catch_up(clients)
        batch = self._accept(clients.consumer, polled)
        self._checkpoint(clients, self._process(batch))
        if batch and self.on_batch is not None:
            self.on_batch(len(batch))
        self._housekeeping(clients)
        if self.policy.notices:
            # Idle evictions: durable before any later input of those keys is
            # answered, so a restart cannot revive a state already announced gone.
            self._flush(clients)
        return True

    def close(self) -> None:
        """Leave the group and close every client, each within what is left of the
        shutdown budget."""
        clients = self._clients
        if clients is None:
            return
        self._closing = True
        # Leaving the group waits for the coordinator: bounded like every wait here,
        # so a broker outage at shutdown cannot hold the process past its deadline.
        close_ms = int(min(CONSUMER_CLOSE_TIMEOUT_S, self._close_budget() / 2) * 1000)
        clients.consumer.close(autocommit=False, timeout_ms=close_ms)
        clients.restorer.consumer.close(timeout_ms=close_ms)
        clients.rebuilder.close()
        clients.checkpointer.close(timeout=self._close_budget())
        log.info("kafka_closed")

    # -- shutdown -------------------------------------------------------------------
    def _watch_shutdown(self) -> None:
        """From SIGTERM, LSTMD_SHUTDOWN_TIMEOUT_S until every retry in hand gives up."""
        self.stop.wait()
        self._deadline = time.monotonic() + self.settings.shutdown_timeout_s
        if not self.abandon.wait(max(0.0, self.settings.shutdown_timeout_s - SHUTDOWN_RESERVE_S)):
            self.abandon.set()

    def _close_budget(self) -> float:
        """What is left of the shutdown budget for closing the producer (its flush)."""
        if self._deadline is None:
            return SHUTDOWN_RESERVE_S
        return max(1.0, self._deadline - time.monotonic())

    def _shutdown_step(self, clients: Clients) -> bool:
        """Shutdown is a phase of the loop: take no new work (every partition paused),
        finish what is in hand, and keep driving the consumer until the final
        checkpoint is committed or the deadline passes. A commit the group deferred
        (a rebalance under way) is retried after the poll that completes the
        rebalance; a partition revoked meanwhile is simply released. False when done."""
        if self._stopping_at_rewinds is None:
            log.info("stopping", reason="signal", pending=self.policy.pending())
            self._stopping_at_rewinds = self._rewinds
        consumer = clients.consumer
        consumer.pause(*consumer.assignment())
        self._flush(clients)
        if self._rewinds != self._stopping_at_rewinds:
            # The final checkpoint was aborted (or given up inside a revocation): the
            # loop rewound, nothing of it is committed, and there is no time to redo it.
            log.warning(
                "shutdown_incomplete",
                reason="the final checkpoint was aborted",
                message="the next owner of these partitions repeats their inputs from the "
                "committed offsets (exactly-once: nothing of the aborted transaction is visible)",
            )
            return False
        if not self.policy.pending():
            log.info("shutdown_checkpointed")
            return False
        if self.abandon.is_set():
            raise DeliveryFailed("the final checkpoint was not committed before the shutdown deadline")
        self._poll(consumer)  # paused: no records, only heartbeats and the rebalance
        self._apply_rebalance(clients)
        return True

    # -- start-up -----------------------------------------------------------------
    def connect(self) -> Clients | None:
        """Topics checked, producer ready, consumer built; None if asked to stop first."""
        admin = wait_for_cluster(self.settings, self.stop, self.health.beat)
        if admin is None:
            return None
        try:
            partitions = ensure_topics(admin, self.settings)
            aligned = outputs_aligned(admin, self.settings, partitions)
            self._input_partitions = partitions
            if self.processor.state_shapes is not None:
                state_bytes = snapshot_bytes(self.processor.model_id, self.processor.state_shapes)
                check_state_record_size(admin, self.settings, state_bytes)
        finally:
            admin.close()
        log.info(
            "kafka_ready",
            input_topic=self.settings.input_topic,
            partitions=partitions,
            state_topic=self.settings.state_topic_name,
            delivery=self.settings.delivery,
            outputs_by_input_partition=aligned,
        )
        txn_id = transactional_id(self.settings)
        try:  # first: it may wait for Kafka, and then nothing else is open yet
            clients = self.assemble(
                lambda: make_consumer(self.settings),
                lambda: make_producer(self.settings, txn_id),
                lambda: make_restore_consumer(self.settings),
            )
        except DeliveryFailed:  # asked to stop meanwhile
            return None
        clients.checkpointer.same_partitions = aligned
        self._await_metadata(clients.consumer)
        return clients

    def assemble(
        self,
        make_consumer: Callable[[], KafkaConsumer],
        make_producer: Callable[[], KafkaProducer],
        make_reader: Callable[[], KafkaConsumer],
    ) -> Clients:
        """The run's parts around its Kafka clients, from their factories: the group's
        consumer, the producer (delivery renews it), and readers by assignment (one
        for the state topic's restore, one per rebuild of the input). The seam where
        tests plug in another Kafka. The producer is built first: it may wait for
        Kafka (DeliveryFailed if `stop` is set meanwhile), and then nothing else is
        open yet."""
        checkpointer = make_delivery(
            self.settings, make_producer, self.metrics, self.stop, abandon=self.abandon, beat=self.health.beat
        )
        consumer = make_consumer()
        restorer = Restorer(make_reader(), self.settings, self.metrics)
        rebuilder = Rebuilder(make_reader, self.settings, self.metrics, self.processor)
        return Clients(consumer, checkpointer, restorer, rebuilder, RebalanceEvents(consumer))

    def _await_metadata(self, consumer: KafkaConsumer, timeout_s: float = 30.0) -> None:
        """Have the input topic's partitions in the consumer's metadata before joining.

        kafka-python 3.0.12 can join a new group before it knows the topic's
        partitions ("No partition metadata for topic"): the leader then assigns
        nothing and was seen not to rejoin for minutes.
        """
        deadline = time.monotonic() + timeout_s
        while not partitions_for_topic(consumer, self.settings.input_topic, timeout_ms=1000):
            if time.monotonic() > deadline or self.stop.wait(0.2):
                log.warning("input_metadata_missing", topic=self.settings.input_topic)
                return
            self.health.beat()

    def _poll(self, consumer: KafkaConsumer) -> dict[TopicPartition, list[Any]]:
        """One poll. A broker gone is not a reason to exit: kafka-python 3.0.12 raises
        a retriable error (KafkaConnectionError from its coordinator lookup) out of
        `poll` during an outage, seen to end a worker in one start of six with the
        broker down 4 s after its assignment. It is polled again, after a pause; the
        liveness probe is not beaten meanwhile, so a consumer that never recovers
        fails `/livez` after LSTMD_KAFKA_MAX_POLL_INTERVAL_MS."""
        try:
            polled: dict[TopicPartition, list[Any]] = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
        except AuthorizationError as exc:  # a group or topic ACL: retrying cannot help
            raise authorization_failure(self.settings, exc) from None
        except FencedInstanceIdError:  # two pods with one LSTMD_GROUP_INSTANCE_ID
            raise fenced_instance(self.settings) from None
        except KafkaError as exc:
            if not exc.retriable:
                raise
            log.warning(
                "poll_failed", error=str(exc), error_class=type(exc).__name__, retry_in_s=POLL_RETRY_S
            )
            self.stop.wait(POLL_RETRY_S)
            return {}
        self.health.beat()
        self.metrics.last_poll.set_to_current_time()
        return polled

    def _throttle(self, clients: Clients) -> None:
        """Bounded in flight: while the producer holds more than the checkpointer's bound,
        every partition is paused, so the loop keeps polling (heartbeats, rebalances,
        SIGTERM) instead of blocking in `send`; it resumes once acknowledgements
        caught up. Not one partition at a time: see `_start_restore`."""
        consumer = clients.consumer
        if clients.checkpointer.backlogged():
            if not self._throttled:
                log.info("backpressure", action="partitions paused until outputs are acknowledged")
                self.metrics.backpressure.inc()
            self._throttled = True
            consumer.pause(*consumer.assignment())
        elif self._throttled:
            self._throttled = False
            consumer.resume(*consumer.assignment())

    # -- the partition lifecycle --------------------------------------------------
    def _before_revoke(
        self, clients: Clients, revoked: set[TopicPartition]
    ) -> dict[TopicPartition, int] | None:
        """Checkpoint what is in hand before partitions are revoked; the offsets for the
        listener to commit (daemon/kafka/listener.py says why there).

        Runs on kafka-python's IO thread inside `poll()` or `close()`, while the loop's
        thread waits in that call, so the store, the policy and the checkpointer are
        not touched by anyone else meanwhile. It never raises (kafka-python would turn
        it into an error out of `poll`): a failure is kept for `_apply_rebalance`. The
        offsets stay pending here whatever the commit's outcome: those of the
        partitions kept are committed again by the next checkpoint, harmlessly.
        """
        if self._closing or self._revocation_failure is not None:
            return None
        cp = self.policy.next_checkpoint(self.policy.take_notices())
        if cp is None:
            return None
        started = time.monotonic()
        budget = max(1.0, self.settings.kafka_session_timeout_ms / 1000 * REVOCATION_SESSION_SHARE)
        try:
            with clients.checkpointer.within(budget):
                clients.checkpointer.deliver(clients.consumer, cp)
        except Exception as exc:
            self._revocation_failure = exc
            log.warning(
                "revocation_checkpoint_failed",
                partitions=sorted(tp.partition for tp in revoked),
                error=str(exc),
                error_class=type(exc).__name__,
            )
            return None
        finally:
            self.policy.checkpointed(cp, committed=False)
        log.info(
            "revocation_checkpointed",
            partitions=sorted(tp.partition for tp in revoked),
            outputs=len(cp.outputs),
            states=len(cp.states),
            seconds=round(time.monotonic() - started, 3),
        )
        return cp.offsets

    def _apply_rebalance(self, clients: Clients) -> bool:
        """Apply the changes the listener collected; True if the loop was rewound to the
        committed offsets (a revocation checkpoint failed), so what was polled with
        them is to be dropped."""
        assigned, revoked, lost = clients.listener.take()
        failure, self._revocation_failure = self._revocation_failure, None
        if not (assigned or revoked or lost or failure):
            return False
        for kind, tps in (("revoked", revoked), ("lost", lost)):
            for tp in tps:
                self._release(tp, clients, kind)
            if tps:
                self.metrics.rebalances.labels(kind=kind).inc()
        now_assigned = clients.consumer.assignment()
        if assigned:
            self.metrics.rebalances.labels(kind="assigned").inc()
            log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))
            # Assigned and revoked again within the same poll: nothing to restore.
            self._start_restore(clients.restorer, assigned & now_assigned)
        self.metrics.assigned.set(len(now_assigned))
        if failure is None:
            return False
        if not isinstance(failure, (DeliveryFailed, TransactionFailed)) or self.abandon.is_set():
            raise failure  # an ACL refused, the shutdown deadline: as from the loop's own checkpoint
        # What it had taken may be half-written: recomputed from the last commit.
        clients.checkpointer.restart()
        self._recover(clients)
        return True

    def _release(self, tp: TopicPartition, clients: Clients, kind: str) -> None:
        # A revoked partition's work was checkpointed in the revocation callback
        # (`_before_revoke`); a lost one's may not be committed any more. Either way
        # dropping the state, the pending offsets and any resend of its outputs is all
        # that is left; the next owner goes on from the last checkpoint (and a rebuild
        # under way, from the old model's states).
        clients.restorer.cancel([tp.partition])
        clients.rebuilder.cancel([tp.partition])
        clients.checkpointer.release(tp.partition)
        self.partitions.release(tp.partition)
        self.policy.release(tp)
        dropped = self.store.drop_partition(tp.partition)
        with contextlib.suppress(KeyError):  # no lag reported for it yet
            self.metrics.lag.remove(str(tp.partition))
        log.info("partition_released", kind=kind, partition=tp.partition, states_dropped=dropped)

    def _start_restore(self, restorer: Restorer, tps: set[TopicPartition]) -> None:
        """Records polled from a partition before it serves are handed back (see
        `_accept`). Not `pause()`: kafka-python 3.0.12 parks data fetched for a
        paused partition and, with other partitions busy, was seen never to
        deliver that partition again after `resume()`."""
        for tp in tps:
            self.store.drop_partition(tp.partition)
        self.partitions.assign(tp.partition for tp in tps)

    def _catch_up(self, clients: Clients) -> None:
        """Move assigned partitions on: a stable committed position first, then their
        states from the state topic; a partition restored serves, unless its open
        sequences of another model are rebuilt first (`_rebuild`)."""
        self._read_positions(clients)
        if clients.restorer.active:
            for partition, states in clients.restorer.step().items():
                self._adopt(clients, partition, states)
        if clients.rebuilder.active:
            self._rebuild(clients)
        self.metrics.active_sequences.set(len(self.store))

    def _adopt(self, clients: Clients, partition: int, states: dict[str, SavedState]) -> None:
        """Install a restored partition's states and serve it, or rebuild it first."""
        if self.settings.on_model_change == "rebuild" and clients.rebuilder.begin(partition, states):
            self.partitions.begin_rebuild(partition)
            log.info(
                "partition_rebuilding",
                partition=partition,
                states=len(states),
                other_model=len(clients.rebuilder.active[partition].saved),
            )
            return
        evicted = adopt(self.store, self.processor.model_id, partition, states, self.processor.state_shapes)
        self.policy.notify(self.processor.announce(evicted))
        self.partitions.restored(partition)
        log.info("partition_restored", partition=partition, states=len(states), discarded=len(evicted))

    def _rebuild(self, clients: Clients) -> None:
        """Move rebuilds on; a partition rebuilt gets its states installed, its
        dropped sequences announced, and all of it checkpointed before it serves:
        its next owner then restores this model's states, not the old ones."""
        ready = []
        for done in clients.rebuilder.step():
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
            self._flush(clients)
            for p in ready:
                self.partitions.rebuilt(p)  # not if the checkpoint aborted: restored again

    def _accept(self, consumer: KafkaConsumer, polled: dict[TopicPartition, list[Any]]) -> list[Any]:
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
                consumer.seek(tp, records[0].offset)
            # else: released within this poll; its next owner reads these records
        return batch

    def _read_positions(self, clients: Clients) -> None:
        """The committed position of each newly assigned partition, once it is stable.

        The consumer reads committed (KIP-447: a transaction still open on the
        partition's offsets makes the broker answer "unstable", and the client waits).
        Only then is the state partition's end read: a transaction committed by the
        previous owner is then on it, its states and its offsets together.
        """
        consumer = clients.consumer
        for p in self.partitions.in_phase(Phase.ASSIGNED):
            if self._stateless(clients, p):
                continue
            tp = TopicPartition(self.settings.input_topic, p)
            try:  # asked again at the next poll while Kafka does not answer
                committed = self._committed(consumer, tp, POSITION_TIMEOUT_MS)
            except KafkaError as exc:
                log.info("position_waiting", partition=p, error=str(exc))
                continue
            if committed is not None:
                self.policy.assigned(tp, committed)
            self.partitions.begin_restore(p)
            clients.restorer.begin([p])

    # -- processing and checkpoints ---------------------------------------------
    def _process(self, batch: list[Any]) -> list[OutputRecord]:
        """The batch applied to the states; its outputs, after the notices pending."""
        outputs = self.policy.take_notices() + self.processor.process(batch)
        for partition, position in self.policy.processed(batch).items():
            self.partitions.advance(partition, position)
        return outputs

    def _flush(self, clients: Clients) -> None:
        """Checkpoint everything pending now (notices included)."""
        self._checkpoint(clients, self.policy.take_notices(), force=True)

    def _checkpoint(self, clients: Clients, outputs: list[OutputRecord], *, force: bool = False) -> None:
        """Publish `outputs`; when the policy says a checkpoint is due, with the
        changed states and the offsets.

        Between two checkpoints the outputs sent are ahead of the committed offsets
        and states: a crash repeats them, identically, from the last checkpoint. An
        output that failed meanwhile makes the checkpoint due at once (it resends).
        """
        checkpointer = clients.checkpointer
        if not self.policy.due(outputs, force=force or checkpointer.failing()):
            checkpointer.send(outputs)  # acknowledged by the next checkpoint
            return
        cp = self.policy.next_checkpoint(outputs)
        if cp is None:
            return
        try:
            committed = clients.checkpointer.commit(clients.consumer, cp)
        except TransactionFailed:
            self._recover(clients)
            return
        except DeliveryFailed:
            self.policy.checkpointed(cp, committed=False)  # still pending: the shutdown warning names it
            raise
        self.policy.checkpointed(cp, committed)

    def _recover(self, clients: Clients) -> None:
        """After an aborted transaction the states in memory include work that was
        never committed: forget them, rewind to the committed offsets, restore."""
        self._rewinds += 1
        consumer = clients.consumer
        assigned = set(consumer.assignment())
        # Rewound before the next poll (as the consumer's own fetches expect), each
        # committed offset read with a bound and retried until the shutdown deadline.
        for tp in sorted(assigned):
            committed = self._committed(consumer, tp, retry=Backoff(self.abandon, beat=self.health.beat))
            if committed is not None:
                consumer.seek(tp, committed)
            else:
                consumer.seek_to_beginning(tp)
        clients.restorer.cancel(list(clients.restorer.active))
        clients.rebuilder.cancel(list(clients.rebuilder.active))
        self.policy.clear()
        self._start_restore(clients.restorer, assigned)
        log.warning("recovering_from_abort", partitions=sorted(tp.partition for tp in assigned))

    def _committed(
        self,
        consumer: KafkaConsumer,
        tp: TopicPartition,
        timeout_ms: int = COMMITTED_TIMEOUT_MS,
        retry: Backoff | None = None,
    ) -> int | None:
        """The partition's committed offset (None: none yet). A missing ACL ends the
        daemon; another Kafka error is retried with `retry` until the shutdown
        deadline, or raised if there is none (the caller asks again later)."""
        while True:
            try:
                committed: int | None = consumer.committed(tp, timeout_ms=timeout_ms)
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

    # -- housekeeping -------------------------------------------------------------
    def _housekeeping(self, clients: Clients) -> None:
        now = time.monotonic()
        if now - self._housekeeping_at < HOUSEKEEPING_INTERVAL_S:
            return
        self._housekeeping_at = now
        consumer = clients.consumer
        self._watch_topics(clients)
        if self.settings.sequence_idle_timeout_s:
            self.policy.notify(self.processor.evict_idle(self.settings.sequence_idle_timeout_s))
        self.metrics.state_bytes.set(self.store.state_bytes())
        self.metrics.ended_sequences.set(self.store.ended())
        self._report_lag(consumer)

    def _report_lag(self, consumer: KafkaConsumer) -> None:
        """Each assigned partition's lag: its end minus the next offset to process.

        The end is the high watermark of the partition's last fetch, except for a
        paused partition (backpressure): it is not fetched, so that figure would
        freeze while producers go on writing. Those partitions' ends are asked of the
        broker instead, once, with a bound (LAG_END_OFFSETS_TIMEOUT_MS); unanswered,
        their gauges keep their last value until the next housekeeping.
        """
        assigned = consumer.assignment()
        paused = consumer.paused() & assigned
        ends: dict[TopicPartition, int] = {}
        if paused:
            try:
                ends = consumer.end_offsets(sorted(paused), timeout_ms=LAG_END_OFFSETS_TIMEOUT_MS)
            except KafkaError as exc:
                log.debug("lag_unknown", partitions=sorted(tp.partition for tp in paused), error=str(exc))
        for tp in assigned:
            high = ends.get(tp) if tp in paused else consumer.highwater(tp)
            position = self.partitions.position(tp.partition)
            if high is None:
                continue
            if position is None:
                try:
                    position = consumer.position(tp, timeout_ms=100)
                except KafkaError:
                    continue
            if position is not None:
                self.metrics.lag.labels(partition=str(tp.partition)).set(max(0, high - position))

    # -- topic changes ------------------------------------------------------------
    def _watch_topics(self, clients: Clients) -> None:
        """Partitions added to the topics while running, as the producer's metadata
        sees them (refreshed every 30 s: clients.METADATA_MAX_AGE_MS). Outputs go to
        their input's partition number only while the output and dead-letter topics
        have the input's count; a grown input topic is announced with the open
        sequences whose key it moves; a state topic smaller than the input is an
        error, and the input partitions it lacks wait (`_stateless`)."""
        layout = known_layout(clients.checkpointer.producer, self.settings)
        if layout is None or layout == self._layout:
            return
        self._layout = layout
        checkpointer = clients.checkpointer
        if checkpointer.same_partitions != layout.aligned:
            checkpointer.same_partitions = layout.aligned
            log.info("outputs_partitioning", by_input_partition=layout.aligned, layout=vars(layout))
        if layout.input > self._input_partitions:
            if self._input_partitions:
                self._announce_growth(self._input_partitions, layout.input)
            self._input_partitions = layout.input
        if layout.stateless:
            log.error(
                "state_partitions_missing",
                state_topic=self.settings.state_topic_name,
                layout=vars(layout),
                waiting=list(layout.stateless),
                action=f"add partitions to the state topic: at least {layout.input}",
            )

    def _announce_growth(self, before: int, after: int) -> None:
        """The input topic grew: a producer's default partitioner now puts some keys in
        another partition (hash modulo the count). An open sequence of such a key keeps
        its state here, in its old partition, where its inputs may still arrive until
        its producers refresh their metadata; its inputs in the new partition start
        over from a zero state. Counted (per partitioner: the daemon cannot know which
        one its producers use) and announced, not dropped (docs/runbook.md)."""
        open_keys = [(p, key) for p, key, state in self.store if state.n]
        moved = moved_sequences(open_keys, before, after)
        for partitioner, count in moved.items():
            self.metrics.moved_sequences.labels(partitioner=partitioner).inc(count)
        log.warning(
            "input_partitions_added",
            **{"from": before, "to": after},
            open_sequences=len(open_keys),
            moved_murmur2=moved["murmur2"],
            moved_crc32=moved["crc32"],
            message="open sequences whose key now hashes to another partition start over there",
        )

    def _stateless(self, clients: Clients, partition: int) -> bool:
        """Whether an assigned input partition has no state partition of its number yet
        (the input topic grew before the state topic): its states could be neither
        restored nor written, so it is not restored and serves nothing until the state
        topic grows. Fresh metadata is asked for once when it starts to wait."""
        known = self._layout.state if self._layout is not None else self._input_partitions
        if partition < known:
            self._held.discard(partition)
            return False
        if partition not in self._held:
            self._held.add(partition)
            refresh_metadata(clients.checkpointer.producer)
            log.info(
                "partition_waiting_for_state",
                partition=partition,
                state_topic=self.settings.state_topic_name,
                state_partitions=known,
            )
        return True
