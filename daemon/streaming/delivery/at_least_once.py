"""At-least-once delivery, pipelined: outputs go out between checkpoints, and a
checkpoint makes sure of them before it commits the offsets they answer.

Each poll batch's outputs (predictions, dead letters, eviction notices) are sent
and the loop polls on; acknowledgements arrive on the producer's IO thread
(in_flight.py tracks them). A due checkpoint is queued without waiting
(pending.py: its states go once the outputs it covers are acknowledged, its
offsets once its states are). The synchronous way, after trouble, for notices,
a forced checkpoint or a revocation, waits for the acknowledgements of what it
covers (everything sent before it), resends what failed in each key's order
(order.py), then writes the state records, then commits the input offsets.
Either way an offset is never committed before every output and state record it
covers is acknowledged. The records in flight are bounded (`backlogged`): past
the bound the run loop pauses its partitions rather than block in `send`.
Without a transaction the only fence against a member the group expelled is
membership itself, checked before every write of a checkpoint.
docs/guarantees.md says what a crash repeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from daemon.core.records import Kind, OutputRecord, StateRecord
from daemon.kafka.acl import fenced_instance
from daemon.kafka.errors import (
    AuthorizationError,
    CommitFailedError,
    FencedInstanceIdError,
    KafkaError,
    RebalanceInProgressError,
)
from daemon.kafka.port import GroupConsumer, TopicPartition
from daemon.kafka.retry import Backoff
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery.errors import CheckpointAbandoned, DeliveryFailed, not_authorized
from daemon.streaming.delivery.in_flight import InFlight
from daemon.streaming.delivery.order import Record, Sent, in_key_order
from daemon.streaming.delivery.pending import PendingCheckpoints
from daemon.streaming.delivery.pipeline import Pipeline
from daemon.streaming.delivery.producer import Producer
from daemon.streaming.policy import Checkpoint

# The package's logger, as before delivery was split into modules.
log = get_logger(__package__ or __name__)

# One wait for an offset commit; retried with a backoff until the shutdown deadline
# (the client's default, 30 s a wait, would outlast LSTMD_SHUTDOWN_TIMEOUT_S).
COMMIT_TIMEOUT_MS = 5000
# Output bytes in flight (sent, not yet acknowledged) past which the run loop stops
# fetching: well below kafka-python's buffer (32 MiB), so `send` never blocks on it.
MAX_IN_FLIGHT_BYTES = 8 << 20


class AtLeastOnce(Pipeline):
    def __init__(self, out: Producer, metrics: Metrics) -> None:
        super().__init__(out, metrics)
        self.in_flight = InFlight(out.note_oversized)
        # Checkpoints cut and not yet committed, made durable between loop steps.
        self.pending = PendingCheckpoints(self.in_flight, out.send, self._account, metrics)

    # -- between checkpoints ---------------------------------------------------------
    def send(self, outputs: Sequence[OutputRecord]) -> None:
        """Send without waiting: the next checkpoint settles them."""
        for item, future in self.out.send(outputs):
            assert isinstance(item, OutputRecord)
            if item.kind is Kind.PREDICTION:
                # Counted and timed when the broker acknowledges it, on the IO thread.
                future.add_callback(self._acknowledged, item.source_timestamp_ms / 1000.0)
            self.in_flight.add(item, future)

    def _acknowledged(self, source_ts_s: float, _metadata: object) -> None:
        """A pipelined prediction acknowledged: counted and timed at once (a count
        kept until the next reap would lag what downstream already reads)."""
        self.metrics.predictions.inc()
        self.metrics.end_to_end.observe(time.time() - source_ts_s)

    def backlogged(self) -> bool:
        """More output bytes in flight than MAX_IN_FLIGHT_BYTES: stop fetching a while."""
        self.in_flight.reap()
        return self.in_flight.bytes > MAX_IN_FLIGHT_BYTES

    def failing(self) -> bool:
        """An output sent between checkpoints failed, or a queued checkpoint met
        trouble: a synchronous checkpoint should resend it now."""
        self.in_flight.reap()
        return self.in_flight.failing() or self.pending.trouble is not None

    def release(self, partition: int) -> None:
        """The input partition was revoked: none of its outputs is sent again (its next
        owner recomputes and publishes them from the last commit, in key order, and a
        late resend from here could land after them), nor its queued states."""
        self.in_flight.release(partition)
        self.pending.release(partition)

    def restart(self) -> None:
        """After a delivery given up on (`within`): nothing in flight or queued is
        tracked any more (the run loop rewinds to the committed offsets and recomputes
        it) and a new producer replaces the one closed by the failed retry."""
        self.in_flight.clear()
        self.pending.take()
        self.out.renew()

    # -- checkpoints that do not wait (pending.py) ---------------------------------------
    def queue(self, consumer: GroupConsumer, cp: Checkpoint) -> bool:
        """Send `cp`'s outputs and queue it: its states and offsets follow as the
        acknowledgements arrive (`advance`). False, nothing sent, when it must go the
        synchronous way: trouble pending, or too many checkpoints queued."""
        if self.failing() or self.pending.full():
            return False
        self.send(cp.outputs)
        self.pending.add(Checkpoint(states=cp.states, offsets=cp.offsets))
        return True

    def advance(self, consumer: GroupConsumer) -> list[Checkpoint]:
        return self.pending.advance(consumer)

    def take_pending(self) -> list[Checkpoint]:
        return self.pending.take()

    # -- a checkpoint ------------------------------------------------------------------
    def _commit(self, consumer: GroupConsumer, cp: Checkpoint) -> bool:
        self.deliver(consumer, cp)
        return self._commit_offsets(consumer, cp.offsets)

    def deliver(self, consumer: GroupConsumer, cp: Checkpoint) -> None:
        """Every output and state record of the checkpoint acknowledged, its offsets
        left for the caller to commit (`commit`, or the revocation listener, which
        commits from kafka-python's IO thread).

        Records, outputs and states alike, are (re)sent only while the consumer is
        still a member of the group: without transactions that is the only fence
        there is. An expelled member that resent an old prediction could land it
        after the next owner's newer one of the same key (a compacted output topic
        would then keep the stale one); the next owner recomputes it instead.
        """
        self.send(cp.outputs)
        owner = consumer.member
        self._wait()  # a checkpoint covers every output in flight
        settled = self.in_flight.settle()
        # A prediction acknowledged once was counted then (`_acknowledged`): when it
        # goes again behind a failure of its key, its repeat is not counted.
        counted = {id(item) for item, f in settled if f.succeeded()}
        self._until_acknowledged(settled, owner, counted, account=False)
        if cp.states:
            self._until_acknowledged(self._send_fenced(cp.states, owner), owner, counted=set())

    def _wait(self) -> None:
        """Flush; a wait that times out is judged by the futures (resent after a backoff)."""
        try:
            self.out.flush()
        except AuthorizationError as exc:
            raise not_authorized(self.settings, exc) from None
        except KafkaError as exc:
            log.error("flush_slow", error=str(exc), action="resend after a backoff")

    def _send_fenced(self, records: Sequence[Record], owner: Callable[[], bool]) -> Sent:
        """Send `records` and wait for them, if this process is still a member."""
        if not owner():
            log.warning(
                "checkpoint_abandoned",
                outputs=sum(isinstance(i, OutputRecord) for i in records),
                states=sum(isinstance(i, StateRecord) for i in records),
                reason="expelled from the group before these records were written",
                action="none sent; the partitions' next owner recomputes them",
            )
            raise CheckpointAbandoned("expelled from the group")
        sent = self.out.send(records)
        self._wait()
        return sent

    def _until_acknowledged(
        self, sent: Sent, owner: Callable[[], bool], counted: set[int], *, account: bool = True
    ) -> None:
        """Judge `sent` (sent and waited for); resend what the key-order rule says, with
        a backoff on a new producer, until all is acknowledged. `account`: count what
        succeeded in `sent` (not for outputs counted at their acknowledgement)."""
        backoff = Backoff(self.out.abandon, beat=self.out.beat)
        while True:
            self.out.note_oversized(sent)
            failed = [(item, f) for item, f in sent if not f.succeeded()]
            resend = in_key_order(sent)
            if account:
                done = {id(item) for item in resend} | counted
                self._account([(item, f) for item, f in sent if f.succeeded() and id(item) not in done])
            if not failed:
                return
            refused = next(
                ((item, f.exception) for item, f in failed if isinstance(f.exception, AuthorizationError)),
                None,
            )
            if refused is not None:
                # Permanent (kafka-python's idempotent producer refuses every later
                # send too): retrying would wait forever. Stop before any commit.
                raise not_authorized(self.settings, refused[1], self.out.topic(refused[0]))
            error = next((f.exception for _, f in failed if f.failed()), "not acknowledged")
            self.metrics.produce_errors.inc()
            log.error("produce_failed", undelivered=len(failed), error=str(error), retry_in_s=backoff.delay)
            # Closed now, so kafka-python's sender cannot spin during the backoff;
            # the next one is built after it (not at all if the shutdown deadline
            # passes meanwhile).
            self.out.close(0)
            if backoff.wait():
                raise DeliveryFailed(f"{len(failed)} records undelivered at shutdown")
            self.out.build()
            sent, account = self._send_fenced(resend, owner), True

    def _commit_offsets(self, consumer: GroupConsumer, offsets: dict[TopicPartition, int]) -> bool:
        """Commit, riding out a coordinator that is moving or a broker that is down."""
        if not offsets:
            return True
        backoff = Backoff(self.out.abandon, beat=self.out.beat)
        while True:
            try:
                consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)
                self.metrics.commits.inc()
                return True
            except (CommitFailedError, RebalanceInProgressError) as exc:
                # The group is rebalancing or moved on. Retrying without polling would
                # wait forever: only poll() completes a rebalance. The caller keeps the
                # offsets for its next checkpoint if it still owns the partitions; a
                # partition's next owner restarts from the previous commit and repeats
                # these outputs identically.
                log.warning("commit_deferred", error=str(exc), cause=type(exc).__name__)
                return False
            except FencedInstanceIdError:
                raise fenced_instance(self.settings) from None
            except AuthorizationError as exc:
                # An ACL missing on the group (or the input topic): permanent, stop.
                raise not_authorized(self.settings, exc) from None
            except KafkaError as exc:
                log.warning("commit_retry", error=str(exc), retry_in_s=backoff.delay)
                if backoff.wait():
                    raise DeliveryFailed(f"offsets not committed at shutdown: {exc}") from exc
