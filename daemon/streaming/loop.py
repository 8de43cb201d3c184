"""The run loop: the only place where Kafka I/O, state and the engine meet.

One `step()`: poll -> apply the rebalance and move assigned partitions through
restore and rebuild (assignment.py) -> process the serving partitions' records
(the core processor) -> publish, and checkpoint when the policy says so
(checkpoints.py, policy.py, made durable by delivery/) -> housekeeping
(housekeeping.py). `run` builds the clients (startup.py), steps until `stop`,
goes through the shutdown phase (steps too, bounded by shutdown.py's deadline)
and closes. Nothing is committed before its outputs and states are durable in
Kafka, so a crash anywhere repeats work and never skips it. How it all fits:
docs/architecture.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.records import OutputRecord
from daemon.core.state import model_tag
from daemon.kafka.acl import authorization_failure, fenced_instance
from daemon.kafka.errors import AuthorizationError, FencedInstanceIdError, KafkaError
from daemon.kafka.port import GroupConsumer, Polled, TopicPartition
from daemon.ops.health import Health
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.schemas.wire import ValueFormats
from daemon.streaming.assignment import Assignment
from daemon.streaming.checkpoints import Checkpoints
from daemon.streaming.delivery import DeliveryFailed
from daemon.streaming.follow import Follower, Followers, Role
from daemon.streaming.housekeeping import Housekeeping
from daemon.streaming.layout import TopicWatch
from daemon.streaming.lifecycle import Partitions
from daemon.streaming.policy import CheckpointPolicy
from daemon.streaming.promote import ModelFile, Promotion, watch_interval
from daemon.streaming.registry import RegistryGate
from daemon.streaming.shutdown import ShutdownDeadline
from daemon.streaming.startup import Clients, Startup, transactional_id

__all__ = ["Clients", "RunLoop", "transactional_id"]

log = get_logger(__name__)

# Short enough that SIGTERM and rebalances are noticed promptly, long enough
# that an idle daemon does not spin.
POLL_TIMEOUT_MS = 200
# After a poll that failed for a retriable reason (the broker away), the pause before
# the next: short, since the loop's other work waits too, yet no spin.
POLL_RETRY_S = 0.5


@dataclass
class _Run:
    """The parts of one run, from `start` on."""

    clients: Clients
    checkpoints: Checkpoints
    assignment: Assignment
    housekeeping: Housekeeping


class RunLoop:
    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        metrics: Metrics,
        health: Health,
        stop: threading.Event,
        on_batch: Callable[[int], None] | None = None,
        formats: ValueFormats | None = None,
        shadow: Processor | None = None,
        load_model: Callable[[Path], Processor] | None = None,
    ) -> None:
        """`on_batch(n)` is called after each poll batch of n > 0 inputs is processed and
        its outputs handed to delivery: a hook for measurements (`lstmd bench`).
        `formats`: the value formats the processor's wire was built from, for the
        registry work around it (daemon/streaming/registry.py); None: JSON.
        `shadow`: the shadow model's processor (LSTMD_SHADOW_MODEL_PATH), its metrics
        discarding (daemon/streaming/follow.py). `load_model`: a model file's processor
        like `shadow`'s, for a new file at LSTMD_MODEL_PATH (daemon/streaming/promote.py;
        None: the file is not watched)."""
        self.settings = settings
        self.processor = processor
        self.store = processor.store
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self.on_batch = on_batch
        self.partitions = Partitions()
        health.watch(self.partitions)
        self.deadline = ShutdownDeadline(stop, settings.shutdown_timeout_s)
        # Set when the shutdown deadline nears: every retry in hand gives up then.
        self.abandon = self.deadline.abandon
        self.policy = CheckpointPolicy(
            self.store,
            processor.model_id,
            interval_s=settings.checkpoint_interval_ms / 1000,
            every_batch=settings.delivery == "exactly-once",
        )
        self.topics = TopicWatch(settings, self.store, metrics)
        # The models beside the serving one: a shadow, a candidate being promoted.
        self.followers = Followers(metrics, settings.shadow_tolerance)
        self.policy.others = self.followers
        self.schemas = formats.inputs if formats is not None else None
        if shadow is not None:
            self.followers.add(Follower(shadow, Role.SHADOW, settings, metrics, self.live_next, self.schemas))
            processor.ys = {}  # compared with the shadow's
        interval = watch_interval(settings)
        watch = None
        if load_model is not None and interval is not None:
            watch = ModelFile(settings.model_path, interval, load_model, model_tag(processor.model_id))
        self.promotion = Promotion(
            settings,
            processor,
            self.followers,
            metrics,
            self.partitions,
            self.policy,
            self._candidate,
            watch,
            lambda: self.startup.state_record_limit,
        )
        # Builds a run's clients: `connect` for the real Kafka; `startup.assemble` from
        # any Kafka's client factories (the seam where tests plug in the in-memory one).
        self.startup = Startup(settings, processor, metrics, health, stop, self.abandon, formats)
        # Input held back while the Schema Registry is away (never dead-lettered for it).
        self.gate = RegistryGate(formats, health, metrics)
        self._throttled = False
        self._backlogged = False
        self._run: _Run | None = None
        # The rewinds counted when the shutdown phase began (None before it).
        self._stopping_at_rewinds: int | None = None

    # -- the run's life ----------------------------------------------------------------
    def run(self) -> None:
        """Serve until `stop` is set; returns after a clean checkpoint and close."""
        self.deadline.watch()
        clients = self.connect()
        if clients is None:
            return
        self.start(clients)
        self.serve()

    def serve(self) -> None:
        """Step until done (`start` first); a shutdown deadline passed with work in
        hand is said, naming what the next owner repeats, never raised."""
        try:
            while self.step():
                pass
        except DeliveryFailed as exc:
            # The shutdown deadline passed with work in hand. Nothing is lost: no
            # offset was committed past an output or state not yet durable.
            repeated: dict[str, dict[str, int | None]] = {
                str(p): {"committed": c, "processed_to": o} for p, (c, o) in self.policy.uncommitted().items()
            }
            # Partitions still catching up (e.g. rewound after an aborted transaction)
            # have no figure here: their next owner repeats from the committed offset.
            for p in sorted(self.partitions.not_serving()):
                repeated.setdefault(str(p), {"committed": None, "processed_to": None})
            log.warning(
                "shutdown_incomplete",
                reason=str(exc),
                repeated_by_next_owner=repeated,
                message="the next owner of these partitions repeats their inputs from the committed offsets",
            )
        finally:
            self.close()

    def connect(self) -> Clients | None:
        """The real Kafka clients of a run, topics checked (startup.py); None if asked
        to stop first."""
        found = self.startup.connect()
        if found is None:
            return None
        clients, self.topics.input_partitions = found
        return clients

    def start(self, clients: Clients) -> None:
        """Take the clients of this run and join the group: `step` may be called from now on."""
        checkpoints = Checkpoints(self.settings, self.policy, clients, recover=lambda: assignment.recover())
        assignment = Assignment(
            self.settings,
            self.processor,
            self.metrics,
            self.health,
            self.partitions,
            self.policy,
            self.topics,
            clients,
            flush=checkpoints.flush,
            abandon=self.abandon,
            followers=self.followers,
        )
        housekeeping = Housekeeping(
            self.settings,
            self.processor,
            self.metrics,
            self.partitions,
            self.policy,
            self.topics,
            self.followers,
        )
        if clients.reader is not None:
            for follower in self.followers.all:
                follower.attach(clients.reader)
        if self.promotion.watch is not None:
            self.promotion.watch.start()
        self._run = _Run(clients, checkpoints, assignment, housekeeping)
        self.topics.watch(clients.delivery)  # the partition counts, before any is assigned
        if self.settings.delivery == "at-least-once":
            # Exactly-once commits every poll batch in its transaction before the next
            # poll: a revocation finds nothing in hand.
            clients.listener.before_revoke = checkpoints.before_revoke
        clients.consumer.subscribe(self.settings.input_topic, clients.listener)
        self.health.reason = "waiting for the group to assign partitions"

    @property
    def clients(self) -> Clients:
        """The Kafka side of the run (from `start` on)."""
        return self._parts().clients

    def _parts(self) -> _Run:
        assert self._run is not None, "start() first"
        return self._run

    def step(self) -> bool:
        """One iteration of the loop; False once it has shut down.

        From `stop` on, each step is one of the shutdown phase (`_shutdown_step`),
        until its final checkpoint is committed or given up.
        """
        run = self._parts()
        if self.stop.is_set():
            return self._shutdown_step(run)
        consumer = run.clients.consumer
        self._throttle(run.clients)
        polled = self._poll(consumer)
        if run.assignment.apply_rebalance(run.checkpoints.take_revocation_failure()):
            polled = {}  # rewound to the committed offsets: polled again
        run.assignment.catch_up()
        if self.followers:
            self.followers.step(self.processor, self.partitions.serving)
        if self.promotion.step():
            # Durable before the new model's first prediction: a restart repeats none
            # of the old model's answers with the new one.
            self.policy.notify(self.processor.announce(self.promotion.switch()))
            run.checkpoints.flush()
        batch = run.assignment.accept(polled)
        if not self.gate.admit(batch):  # the registry is away: read again after a backoff
            run.assignment.hand_back(batch)
            batch = []
        run.checkpoints.publish(self._process(batch))
        if batch and self.on_batch is not None:
            self.on_batch(len(batch))
        run.housekeeping.run(run.clients)
        if self.policy.notices:
            # Idle evictions: durable before any later input of those keys is
            # answered, so a restart cannot revive a state already announced gone.
            run.checkpoints.flush()
        return True

    def close(self) -> None:
        """Leave the group and close every client, each within what is left of the
        shutdown budget."""
        if self._run is None:
            return
        clients = self._run.clients
        self._run.checkpoints.closing = True  # the close revokes: nothing is left to save
        close_ms = self.deadline.consumer_close_ms()
        clients.consumer.close(close_ms)
        clients.restorer.consumer.close(close_ms)
        clients.rebuilder.close()
        if self.promotion.watch is not None:
            self.promotion.watch.stop()
        self.followers.close()
        clients.delivery.close(timeout=self.deadline.close_budget())
        log.info("kafka_closed")

    # -- the steps' parts ----------------------------------------------------------------
    def _candidate(self, processor: Processor) -> Follower:
        """A new model at LSTMD_MODEL_PATH, following beside the serving one until promoted."""
        follower = Follower(
            processor, Role.CANDIDATE, self.settings, self.metrics, self.live_next, self.schemas
        )
        reader = self._parts().clients.reader
        if reader is not None:
            follower.attach(reader)
        return follower

    def live_next(self, partition: int) -> int | None:
        """The next offset the loop processes in `partition`: where it stands, or its
        committed position until it has processed one; None while neither is known."""
        position = self.partitions.position(partition)
        if position is None:
            position = self.policy.committed.get(TopicPartition(self.settings.input_topic, partition))
        return position

    def _shutdown_step(self, run: _Run) -> bool:
        """Shutdown is a phase of the loop: take no new work (every partition paused),
        finish what is in hand, and keep driving the consumer until the final
        checkpoint is committed or the deadline passes. A commit the group deferred
        (a rebalance under way) is retried after the poll that completes the
        rebalance; a partition revoked meanwhile is simply released. False when done."""
        if self._stopping_at_rewinds is None:
            log.info("stopping", reason="signal", pending=self.policy.pending())
            self._stopping_at_rewinds = run.assignment.rewinds
        consumer = run.clients.consumer
        consumer.pause(*consumer.assignment())
        run.checkpoints.flush()
        if run.assignment.rewinds != self._stopping_at_rewinds:
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
        run.assignment.apply_rebalance(run.checkpoints.take_revocation_failure())
        return True

    def _poll(self, consumer: GroupConsumer) -> Polled:
        """One poll. A broker gone is not a reason to exit: kafka-python 3.0.12 raises
        a retriable error (KafkaConnectionError from its coordinator lookup) out of
        `poll` during an outage, seen to end a worker in one start of six with the
        broker down 4 s after its assignment. It is polled again, after a pause; the
        liveness probe is not beaten meanwhile, so a consumer that never recovers
        fails `/livez` after LSTMD_KAFKA_MAX_POLL_INTERVAL_MS."""
        try:
            # While a model beside the serving one builds, its slices are the wait.
            polled = consumer.poll(0 if self.followers.building() else POLL_TIMEOUT_MS)
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
        """Bounded in flight: while the producer holds more than delivery's bound,
        every partition is paused, so the loop keeps polling (heartbeats, rebalances,
        SIGTERM) instead of blocking in `send`; it resumes once acknowledgements
        caught up. Paused alike while input waits for the Schema Registry. Not one
        partition at a time: see assignment.py `_start_restore`."""
        consumer = clients.consumer
        backlogged = clients.delivery.backlogged()
        if backlogged or self.gate.holding:
            if backlogged and not self._backlogged:
                log.info("backpressure", action="partitions paused until outputs are acknowledged")
                self.metrics.backpressure.inc()
            self._backlogged = backlogged
            self._throttled = True
            consumer.pause(*consumer.assignment())
        elif self._throttled:
            self._throttled = self._backlogged = False
            consumer.resume(*consumer.assignment())

    def _process(self, batch: list[Any]) -> list[OutputRecord]:
        """The batch applied to the states; its outputs, after the notices pending."""
        outputs = self.policy.take_notices() + self.processor.process(batch)
        if self.followers:
            outputs += self.followers.process(self.processor, batch)
        for partition, position in self.policy.processed(batch).items():
            self.partitions.advance(partition, position)
        return outputs
