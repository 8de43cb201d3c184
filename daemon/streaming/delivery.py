"""Delivery: making a checkpoint durable in Kafka, in order, through faults.

What a checkpoint carries and when one is due is the policy's (policy.py);
this module publishes it:

* at-least-once, pipelined: each poll batch's outputs (predictions, dead
  letters, eviction notices) are sent and the loop polls on; acknowledgements
  arrive on the producer's IO thread. A checkpoint waits only for the
  acknowledgements of what it covers (everything sent before it), resends what
  failed in each key's order, then writes the state records, then commits the
  input offsets: an offset is never committed before every output and state
  record it covers is acknowledged. The records in flight are bounded
  (`backlogged`): past the bound the run loop pauses its partitions rather than
  block in `send`. A crash before the commit repeats outputs with identical
  values (the restored state is either the old one, so the inputs are recomputed
  from the same state, or the new one, whose watermark makes the repeated inputs
  skip); nothing is lost and no input advances a state twice.
* exactly-once: outputs, state records and offsets go in one Kafka transaction
  per poll batch (KIP-447: offsets sent with the consumer's group metadata, so a
  process that lost its partitions cannot commit). Any failure aborts the
  transaction; the run loop then drops its states and restores them from the
  state topic.

A planned revocation (a worker or pod joining, this one leaving) is checkpointed
inside kafka-python's revocation callback (daemon/kafka/listener.py, the run
loop's `_before_revoke`): outputs and states acknowledged (`deliver`, bounded by
`within`), offsets committed within the generation that revoked them, so the next
owner repeats nothing. A lost partition's uncommitted work is dropped: its next
owner recomputes it from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    AuthorizationError,
    CommitFailedError,
    CoordinatorNotAvailableError,
    FencedInstanceIdError,
    InvalidProducerEpochError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    NotCoordinatorError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumberError,
    ProducerFencedError,
    RebalanceInProgressError,
    RecordListTooLargeError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
)
from kafka.future import Future
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from daemon.config import Settings
from daemon.core.records import Kind, OutputRecord, StateRecord
from daemon.errors import KafkaSetupError
from daemon.kafka.acl import authorization_failure, fenced_instance
from daemon.kafka.clients import (
    abort_transaction,
    close_producer,
    commit_transaction,
    send_offsets_to_transaction,
)
from daemon.kafka.retry import Backoff
from daemon.kafka.topics import refresh_metadata, unlisted
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.policy import Checkpoint

log = get_logger(__name__)

# How long one wait for acknowledgements lasts before the daemon says it is still
# waiting (the producer itself retries until its delivery timeout, 2 minutes).
FLUSH_TIMEOUT_S = 10.0


# Broker refusals of a record itself: after one, a transactional producer is unusable.
RECORD_REFUSALS = (MessageSizeTooLargeError, RecordListTooLargeError, OutOfOrderSequenceNumberError)
# Why a transaction was aborted, as a bounded metric label (the log names the error).
ABORT_CAUSES = ("timeout", "fenced", "refused", "unavailable", "other")
# Sources of oversized dead letters kept to recognise them when their batch is redone.
MAX_OVERSIZED_REMEMBERED = 10_000
# One wait for an offset commit; retried with a backoff until the shutdown deadline
# (the client's default, 30 s a wait, would outlast LSTMD_SHUTDOWN_TIMEOUT_S).
COMMIT_TIMEOUT_MS = 5000
# Output bytes in flight (sent, not yet acknowledged) past which the run loop stops
# fetching: well below kafka-python's buffer (32 MiB), so `send` never blocks on it.
MAX_IN_FLIGHT_BYTES = 8 << 20
# How long a send for a partition the producer does not know waits for fresh metadata.
METADATA_WAIT_S = 5.0


class SendRefused(KafkaError):
    """The client refused one record's send with an error of its own, not a KafkaError
    (kafka-python raises ValueError for a partition its metadata does not know yet,
    TypeError or AssertionError for a record it cannot serialise): that record's
    failure, retried (or its transaction aborted) like any failed send."""


class DeliveryFailed(Exception):
    """Outputs could not be published before the daemon was asked to stop."""


class TransactionFailed(Exception):
    """The checkpoint's transaction was aborted: the states in memory are suspect."""


class CheckpointAbandoned(TransactionFailed):
    """At-least-once: the group expelled this member before the checkpoint's records
    were all written. Writing them later (a state record, or a resend of an output)
    could land over newer ones of the partitions' next owner, so nothing more is
    sent: the next owner recomputes them, and the run loop restores, like after an
    abort."""


class Checkpointer:
    def __init__(
        self,
        settings: Settings,
        make_producer: Callable[[], KafkaProducer],
        metrics: Metrics,
        stop: threading.Event,
        *,
        abandon: threading.Event | None = None,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        """`stop` ends the wait for a first producer (SIGTERM at start-up: nothing is in
        hand). `abandon` ends every later retry: the shutdown deadline, so a checkpoint
        in progress at SIGTERM keeps trying until then. `beat` is called while waiting
        on Kafka (the liveness probe)."""
        self.settings = settings
        self.make_producer = make_producer
        self.metrics = metrics
        self.stop = stop
        self.abandon = abandon if abandon is not None else stop
        self.beat = beat
        self.transactional = settings.delivery == "exactly-once"
        # Sources (partition, offset) of dead letters the topic refused for their size
        # (see `_note_oversized`).
        self._oversized: set[tuple[int, int]] = set()
        # At-least-once, between checkpoints: outputs sent, in send order, until reaped.
        self._in_flight: deque[tuple[OutputRecord, Future]] = deque()
        self._in_flight_bytes = 0
        # Reaped outputs to send again (a failure, and every later record of its key).
        self._broken: set[tuple[str, bytes | str | None]] = set()
        self._resend: list[tuple[OutputRecord, Future]] = []
        # Input partition p's outputs go to partition p of the output and dead-letter
        # topics (set by the run loop when their partition counts equal the input's).
        self.same_partitions = False
        for kind in ("state", "tombstone"):  # every label value starts at 0
            metrics.state_records.labels(kind=kind)
        for cause in ABORT_CAUSES:
            metrics.transaction_aborts.labels(cause=cause)
        self.producer = self._new_producer(self.stop)

    def _new_producer(self, stop: threading.Event) -> KafkaProducer:
        """A producer ready to send, waiting out a cluster that does not answer yet.

        Building one bootstraps (and, transactional, finds the transaction
        coordinator and fences this id's previous producer): during a broker
        outage both time out, which is a reason to wait, not to exit.
        """
        backoff = Backoff(stop, beat=self.beat)
        while True:
            producer: KafkaProducer | None = None
            try:
                producer = self.make_producer()
                if self.transactional:
                    producer.init_transactions()
                return producer
            except KafkaError as exc:
                if producer is not None:
                    close_producer(producer, 0)
                if isinstance(exc, AuthorizationError):
                    raise self._not_authorized(exc) from None
                log.warning("producer_unavailable", error=str(exc), retry_in_s=backoff.delay)
                if backoff.wait():
                    raise DeliveryFailed(f"no producer at shutdown: {exc}") from exc

    def _renew_producer(self) -> None:
        """Replace the producer. kafka-python 3.0.12's sender spins on a core while it
        holds records for a partition without a leader (a deleted topic, a broker
        gone), and a transactional producer whose transaction the coordinator timed
        out is fenced for good: drop it (what it still holds fails) and start anew."""
        close_producer(self.producer, 0)
        self.producer = self._new_producer(self.abandon)

    def _flush(self) -> None:
        """Wait for every acknowledgement, up to FLUSH_TIMEOUT_S, in one-second slices
        that beat the liveness probe and give up at the shutdown deadline."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while True:
            try:
                self.producer.flush(timeout=1.0)
                return
            except KafkaTimeoutError:
                self.beat()
                if self.abandon.is_set() or time.monotonic() >= deadline:
                    raise

    def close(self, timeout: float) -> None:
        close_producer(self.producer, timeout)

    def commit(self, consumer: KafkaConsumer, cp: Checkpoint) -> bool:
        """Make the checkpoint durable. Returns False if the offsets could not be
        committed because the group moved on (at-least-once: harmless repeats)."""
        started = time.perf_counter()
        try:
            if self.transactional:
                self._transaction(consumer, cp)
                return True
            self.deliver(consumer, cp)
            return self._commit_offsets(consumer, cp.offsets)
        finally:
            self.metrics.checkpoint.observe(time.perf_counter() - started)

    def deliver(self, consumer: KafkaConsumer, cp: Checkpoint) -> None:
        """At-least-once: every output and state record of the checkpoint acknowledged,
        its offsets left for the caller to commit (`commit`, or the revocation
        listener, which commits from kafka-python's IO thread)."""
        self.send(cp.outputs)
        member = functools.partial(_member, consumer)  # the fence of every (re)send
        self._publish([], [], owner=member, settled=self._settle())
        self._publish([], cp.states, owner=member)

    @contextlib.contextmanager
    def within(self, seconds: float) -> Iterator[None]:
        """Every wait and retry inside gives up after `seconds` (DeliveryFailed), or
        at the shutdown deadline if that comes first: for a checkpoint that must not
        hold the consumer's IO thread longer (see the revocation listener)."""
        outer, bound = self.abandon, threading.Event()
        if outer.is_set():
            bound.set()
        timer = threading.Timer(seconds, bound.set)
        timer.daemon = True
        timer.start()
        self.abandon = bound
        try:
            yield
        finally:
            timer.cancel()
            self.abandon = outer

    def restart(self) -> None:
        """After a delivery given up on (`within`): nothing in flight is tracked any
        more (the run loop rewinds to the committed offsets and recomputes it) and a
        new producer replaces the one closed by the failed retry."""
        self._in_flight.clear()
        self._in_flight_bytes = 0
        self._resend, self._broken = [], set()
        self._renew_producer()

    # -- at-least-once between checkpoints --------------------------------------
    def send(self, outputs: Sequence[OutputRecord]) -> None:
        """Send without waiting (at-least-once): the next checkpoint settles them."""
        for item, future in self._send(outputs, []):
            assert isinstance(item, OutputRecord)
            if item.kind is Kind.PREDICTION:
                # Counted and timed when the broker acknowledges it, on the IO thread.
                future.add_callback(self._acknowledged, item.source_timestamp_ms / 1000.0)
            self._in_flight.append((item, future))
            self._in_flight_bytes += len(item.value or b"")

    def _acknowledged(self, source_ts_s: float, _metadata: object) -> None:
        """A pipelined prediction acknowledged: counted and timed at once (a count
        kept until the next reap would lag what downstream already reads)."""
        self.metrics.predictions.inc()
        self.metrics.end_to_end.observe(time.time() - source_ts_s)

    def backlogged(self) -> bool:
        """More output bytes in flight than MAX_IN_FLIGHT_BYTES: stop fetching a while."""
        self._reap()
        return self._in_flight_bytes > MAX_IN_FLIGHT_BYTES

    def failing(self) -> bool:
        """An output sent between checkpoints failed: a checkpoint should resend it now."""
        self._reap()
        return bool(self._resend)

    def release(self, partition: int) -> None:
        """The input partition was revoked: none of its outputs is sent again (its next
        owner recomputes and publishes them from the last commit, in key order, and a
        late resend from here could land after them)."""
        self._reap()
        self._in_flight = deque((i, f) for i, f in self._in_flight if i.partition != partition)
        self._in_flight_bytes = sum(len(i.value or b"") for i, _ in self._in_flight)
        self._resend = [(i, f) for i, f in self._resend if i.partition != partition]
        # A key is broken from its first failure on, and that failure is in _resend.
        self._broken = {_destination(i) for i, _ in self._resend}

    def _reap(self) -> None:
        """Let go of the outputs acknowledged or failed so far, in send order (only
        the done prefix: what follows an unfinished send waits for it). From a failed
        output on, every later output of its key is kept to be sent again, so a resend
        never lands after a later record of its key."""
        in_flight = self._in_flight
        while in_flight and in_flight[0][1].is_done:
            item, future = in_flight.popleft()
            self._in_flight_bytes -= len(item.value or b"")
            where = _destination(item)
            if not future.succeeded():
                self._broken.add(where)
                if _refused_as_too_large(item, future):
                    self._remember_oversized({(item.partition, item.offset)})
            if where in self._broken:
                self._resend.append((item, future))

    def _settle(self) -> list[tuple[OutputRecord | StateRecord, Future]]:
        """Wait for every output in flight (a checkpoint covers them all); return, in
        send order, those to judge again: the failed ones with every later output of
        their keys, and those still unacknowledged when the wait timed out."""
        self._wait()
        self._reap()
        settled: list[tuple[OutputRecord | StateRecord, Future]] = [*self._resend, *self._in_flight]
        self._in_flight.clear()
        self._in_flight_bytes = 0
        self._resend, self._broken = [], set()
        return settled

    def _wait(self) -> None:
        """Flush; a wait that times out is judged by the futures (resent after a backoff)."""
        try:
            self._flush()
        except AuthorizationError as exc:
            raise self._not_authorized(exc) from None
        except KafkaError as exc:
            log.error("flush_slow", error=str(exc), action="resend after a backoff")

    def _commit_offsets(self, consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> bool:
        """Commit, riding out a coordinator that is moving or a broker that is down."""
        if not offsets:
            return True
        backoff = Backoff(self.abandon, beat=self.beat)
        while True:
            try:
                consumer.commit(
                    {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()},
                    timeout_ms=COMMIT_TIMEOUT_MS,
                )
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
                raise self._not_authorized(exc) from None
            except KafkaError as exc:
                log.warning("commit_retry", error=str(exc), retry_in_s=backoff.delay)
                if backoff.wait():
                    raise DeliveryFailed(f"offsets not committed at shutdown: {exc}") from exc

    def _transaction(self, consumer: KafkaConsumer, cp: Checkpoint) -> None:
        topic: str | None = None  # of the refused record, if one was
        try:
            self.producer.begin_transaction()
            sent = self._send(cp.outputs, cp.states)
            self._flush()
            failed = next(((item, f) for item, f in sent if not f.succeeded()), None)
            self._note_oversized(sent)
            if failed is not None:
                topic = self._topic(failed[0])
                raise failed[1].exception or KafkaError("a record was not acknowledged")
            # Every transaction is fenced, offsets or not (a tombstone or a notice
            # alone could otherwise land over the partitions' next owner): an expelled
            # member commits nothing, and the offsets (the policy sends those of every
            # owned partition) make the broker check the group generation (KIP-447).
            group = consumer.group_metadata()  # type: ignore[no-untyped-call]
            if _expelled(group):
                # The broker would accept offsets without a generation unchecked,
                # for partitions that another member may own now.
                raise CommitFailedError("not a member of the group any more")
            if cp.offsets:
                send_offsets_to_transaction(
                    self.producer,
                    {tp: OffsetAndMetadata(o, "", -1) for tp, o in cp.offsets.items()},
                    group,
                    self.abandon,
                    self.beat,
                )
            commit_transaction(self.producer, self.abandon, self.beat)
        except KafkaError as exc:
            cause = abort_cause(exc)
            self.metrics.transaction_aborts.labels(cause=cause).inc()
            log.warning("transaction_aborted", error=str(exc), cause=cause, error_class=type(exc).__name__)
            # kafka-python 3.0.12 keeps a refused record's sequence numbers after the
            # abort (the next transaction fails with OutOfOrderSequenceNumber): only a
            # new producer starts clean.
            unusable = isinstance(exc, RECORD_REFUSALS)
            try:
                abort_transaction(self.producer, self.abandon, self.beat)
            except KafkaError as abort_exc:
                # Fatal for this producer (e.g. its epoch was bumped because the
                # transaction outlived its timeout): the broker aborts the
                # transaction anyway; a new producer fences what is left of it.
                log.error("abort_failed", error=str(abort_exc), action="new producer")
                unusable = True
            if isinstance(exc, AuthorizationError):
                # Redoing the transaction would be refused again, forever: stop.
                raise self._not_authorized(exc, topic) from None
            if unusable:
                self._renew_producer()
            raise TransactionFailed(str(exc)) from exc
        self._account(sent)
        self.metrics.commits.inc()

    def _send(
        self, outputs: Sequence[OutputRecord], states: Sequence[StateRecord]
    ) -> list[tuple[OutputRecord | StateRecord, Future]]:
        """Send each record; what the client refuses for one record is that record's
        failed future (a transactional send raises instead: the transaction aborts and
        the batch is recomputed). Never an exception out of the loop for one record."""
        sent: list[tuple[OutputRecord | StateRecord, Future]] = []
        refused: KafkaError | None = None
        items: list[OutputRecord | StateRecord] = [*outputs, *states]
        for item in items:
            if refused is not None:  # one refusal (e.g. a deleted topic) fails the rest at once
                sent.append((item, Future().failure(refused)))
                continue
            try:
                item, future = self._send_one(item)
            except KafkaError as exc:
                # send() refused within max_block_ms: no metadata for the topic.
                if self.transactional:
                    raise  # the transaction aborts and the batch is recomputed
                refused = exc
                future = Future().failure(exc)
            except Exception as exc:
                # This record's own problem (not the topic's): the others go on.
                error = SendRefused(f"{type(exc).__name__}: {exc}")
                log.error(
                    "send_refused",
                    error=str(error),
                    partition=item.partition,
                    offset=item.offset if isinstance(item, OutputRecord) else None,
                )
                if self.transactional:
                    raise error from exc
                future = Future().failure(error)
            sent.append((item, future))
        return sent

    def _send_one(self, item: OutputRecord | StateRecord) -> tuple[OutputRecord | StateRecord, Future]:
        """Send one record; a dead letter the client refuses (too large, or any error of
        its own) is sent smaller (`OutputRecord.without_value`), down to the daemon's
        headers alone, which always go: a dead letter can always be sent."""
        if isinstance(item, StateRecord):
            topic = self.settings.state_topic_name
            return item, self._send_to(topic, item.partition, key=item.key.encode(), value=item.value)
        if item.dead_letter and item.value and (item.partition, item.offset) in self._oversized:
            item = _too_large(item, "broker")
        while True:
            try:
                return item, self._send_output(item)
            except Exception as exc:
                size = isinstance(exc, MessageSizeTooLargeError)
                if not item.dead_letter or item.bare or (isinstance(exc, KafkaError) and not size):
                    raise
                item = _too_large(item, "producer", "" if size else f"{type(exc).__name__}: {exc}")

    def _note_oversized(self, sent: Iterable[tuple[OutputRecord | StateRecord, Future]]) -> None:
        """Remember the dead letters the topic refused for their size: whenever they
        are sent again (resent, or recomputed after an abort), `_send` leaves their
        value out. Retrying one unchanged would block its partition forever."""
        oversized = {
            (item.partition, item.offset)
            for item, f in sent
            if isinstance(item, OutputRecord) and _refused_as_too_large(item, f)
        }
        self._remember_oversized(oversized)

    def _remember_oversized(self, oversized: set[tuple[int, int]]) -> None:
        if oversized:
            if len(self._oversized) > MAX_OVERSIZED_REMEMBERED:
                self._oversized.clear()  # older ones were long recomputed and sent
            self._oversized |= oversized

    def _send_output(self, item: OutputRecord) -> Future:
        topic = self.settings.dead_letter_topic if item.dead_letter else self.settings.output_topic
        return self._send_to(
            topic,
            # Stable key -> partition and no murmur2 per record, when the counts agree.
            item.partition if self.same_partitions else None,
            key=item.key,
            value=item.value,
            headers=item.headers or None,
        )

    def _send_to(self, topic: str, partition: int | None, **record: Any) -> Future:
        """`producer.send`, through a partition added to the topic since the producer
        last refreshed its metadata: that refusal forces a refresh, then the record goes
        there. A partition the topic still lacks means an output topic with fewer
        partitions than the input: outputs go by key from now on (the run loop sets
        `same_partitions` again once the counts agree). A state record for it fails
        (retried; the run loop serves no input partition the state topic lacks)."""
        try:
            return self.producer.send(topic, partition=partition, **record)
        except ValueError:
            if partition is None or not unlisted(self.producer, topic, partition):
                raise  # another refusal, e.g. neither key nor value
        refresh_metadata(self.producer, wait_s=METADATA_WAIT_S)
        if not unlisted(self.producer, topic, partition):
            return self.producer.send(topic, partition=partition, **record)
        if topic == self.settings.state_topic_name:
            raise UnknownTopicOrPartitionError(f"{topic} has no partition {partition}")
        self.same_partitions = False
        log.warning(
            "outputs_by_key", topic=topic, partition=partition, reason="the topic lacks the partition"
        )
        return self.producer.send(topic, partition=None, **record)

    def _topic(self, item: OutputRecord | StateRecord) -> str:
        s = self.settings
        if isinstance(item, StateRecord):
            return s.state_topic_name
        return s.dead_letter_topic if item.dead_letter else s.output_topic

    @staticmethod
    def _in_key_order(
        sent: Sequence[tuple[OutputRecord | StateRecord, Future]],
    ) -> list[OutputRecord | StateRecord]:
        """What to send again after a partial failure, keeping each key's order: from
        the first failed record of a key on, every later record of that key goes again
        (those already acknowledged too: a repeat, identical), never a failed record
        after a later one of its key (a tombstone after the key's new state, a
        prediction after the next step's)."""
        broken: set[tuple[str, bytes | str | None]] = set()
        resend: list[OutputRecord | StateRecord] = []
        for item, future in sent:
            where = _destination(item)
            if not future.succeeded():
                broken.add(where)
            if where in broken:
                resend.append(item)
        return resend

    def _not_authorized(self, exc: Exception, topic: str | None = None) -> KafkaSetupError:
        """Kafka refused an ACL: a permanent error, never retried. Nothing past the
        refused records is committed; the daemon ends with exit code 2."""
        error = authorization_failure(self.settings, exc, topic)
        log.error("not_authorized", error=str(error), cause=type(exc).__name__)
        return error

    def _account(self, sent: Iterable[tuple[OutputRecord | StateRecord, Future]]) -> None:
        now = time.time()
        predictions = 0
        for item, _ in sent:
            if isinstance(item, StateRecord):
                kind = "tombstone" if item.value is None else "state"
                self.metrics.state_records.labels(kind=kind).inc()
            elif item.kind is Kind.PREDICTION:
                predictions += 1
                self.metrics.end_to_end.observe(now - item.source_timestamp_ms / 1000.0)
        self.metrics.predictions.inc(predictions)

    def _publish(
        self,
        outputs: Sequence[OutputRecord],
        states: Sequence[StateRecord],
        owner: Callable[[], bool] = lambda: True,
        settled: list[tuple[OutputRecord | StateRecord, Future]] | None = None,
    ) -> None:
        """Send and wait for every acknowledgement, retrying what failed with backoff.
        `settled`: records already sent and waited for (the pipelined outputs that
        failed or were not acknowledged in time), in send order, to judge first.

        Records, outputs and states alike, are (re)sent only while `owner()` says this
        process is still a member of the group: without transactions that is the only
        fence there is. An expelled member that resent an old prediction could land it
        after the next owner's newer one of the same key (a compacted output topic
        would then keep the stale one); the next owner recomputes it instead.
        """
        pending_out, pending_states = list(outputs), list(states)
        # A settled prediction acknowledged once was counted then (`_acknowledged`):
        # when it goes again behind a failure of its key, its repeat is not counted.
        counted = {id(item) for item, f in settled or () if f.succeeded()}
        backoff = Backoff(self.abandon, beat=self.beat)
        while pending_out or pending_states or settled:
            account = not settled  # a settled prediction was counted at its acknowledgement
            if settled:
                sent, settled = settled, None
            else:
                if not owner():
                    log.warning(
                        "checkpoint_abandoned",
                        outputs=len(pending_out),
                        states=len(pending_states),
                        reason="expelled from the group before these records were written",
                        action="none sent; the partitions' next owner recomputes them",
                    )
                    raise CheckpointAbandoned("expelled from the group")
                sent = self._send(pending_out, pending_states)
                self._wait()
            self._note_oversized(sent)
            failed = [(item, f) for item, f in sent if not f.succeeded()]
            resend = self._in_key_order(sent)
            again = {id(item) for item in resend}
            if account:
                done = again | counted
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
                raise self._not_authorized(refused[1], self._topic(refused[0]))
            pending_out = [i for i in resend if isinstance(i, OutputRecord)]
            pending_states = [i for i in resend if isinstance(i, StateRecord)]
            error = next((f.exception for _, f in failed if f.failed()), "not acknowledged")
            self.metrics.produce_errors.inc()
            log.error("produce_failed", undelivered=len(failed), error=str(error), retry_in_s=backoff.delay)
            # Closed now, so kafka-python's sender cannot spin during the backoff;
            # the next one is built after it (not at all if the shutdown deadline
            # passes meanwhile).
            close_producer(self.producer, 0)
            if backoff.wait():
                raise DeliveryFailed(f"{len(failed)} records undelivered at shutdown")
            self.producer = self._new_producer(self.abandon)


def _destination(item: OutputRecord | StateRecord) -> tuple[str, bytes | str | None]:
    """What Kafka orders records by, here: the kind of topic and the key."""
    if isinstance(item, StateRecord):
        return "state", item.key
    return ("dlq" if item.dead_letter else "out"), item.key


def abort_cause(exc: KafkaError) -> str:
    """The ABORT_CAUSES label of an error that aborted a transaction."""
    if isinstance(exc, RECORD_REFUSALS):
        return "refused"
    if isinstance(exc, (ProducerFencedError, InvalidProducerEpochError, CommitFailedError)):
        return "fenced"  # another producer with our id, or the group moved on
    if isinstance(exc, (KafkaTimeoutError, RequestTimedOutError)):
        return "timeout"
    if isinstance(
        exc,
        (
            KafkaConnectionError,
            NodeNotReadyError,
            NotLeaderForPartitionError,
            CoordinatorNotAvailableError,
            NotCoordinatorError,
        ),
    ):
        return "unavailable"
    return "other"


def _refused_as_too_large(item: OutputRecord, future: Future) -> bool:
    """A dead letter the dead-letter topic refused for its size (its max.message.bytes
    is below what the daemon produces), with a value to leave out. The broker refuses a
    whole batch: only the value is left out then, never the key (the key of a batch-mate
    of a large record is not too large)."""
    return (
        item.dead_letter
        and bool(item.value)
        and isinstance(future.exception, (MessageSizeTooLargeError, RecordListTooLargeError))
    )


def _too_large(item: OutputRecord, refused_by: str, error: str = "") -> OutputRecord:
    """The dead letter made smaller (its value left out; then its key and the input's
    headers), after the producer or the broker refused it (`error`: not for its size)."""
    smaller = item.without_value()
    log.warning(
        "dead_letter_bare" if smaller.bare else "dead_letter_value_omitted",
        refused_by=refused_by,
        bytes=item.size,
        partition=item.partition,
        offset=item.offset,
        **({"error": error} if error else {}),
    )
    return smaller


def _expelled(group: ConsumerGroupMetadata) -> bool:
    """kafka-python reset the generation: the group expelled this member
    (max.poll.interval exceeded, session expired), its partitions are another's."""
    return bool(group.generation_id < 0)


def _member(consumer: KafkaConsumer) -> bool:
    return not _expelled(consumer.group_metadata())  # type: ignore[no-untyped-call]
