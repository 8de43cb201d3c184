"""The producer as delivery uses it: every kafka-python producer call of both
pipelines is here, with what kafka-python 3.0.12 makes of it.

Building one waits out a cluster that does not answer yet; one is renewed when it
cannot be used any more; a record's send goes through a partition added to a topic
since the producer's metadata was last refreshed; a dead letter too large for the
client or the topic is sent smaller. The pipelines (at_least_once.py,
transactional.py) decide what is sent when, and what a failure means.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from daemon.config import Settings
from daemon.core.records import Kind, OutputRecord, StateRecord
from daemon.kafka.errors import (
    AuthorizationError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnknownTopicOrPartitionError,
)
from daemon.kafka.port import Future, RecordProducer
from daemon.kafka.retry import Backoff
from daemon.kafka.topics import unlisted
from daemon.ops.logs import get_logger
from daemon.streaming.delivery.errors import DeliveryFailed, SendRefused, not_authorized
from daemon.streaming.delivery.order import Record, Sent

# The package's logger, as before delivery was split into modules.
log = get_logger(__package__ or __name__)

# How long one wait for acknowledgements lasts before the daemon says it is still
# waiting (the producer itself retries until its delivery timeout, 2 minutes).
FLUSH_TIMEOUT_S = 10.0
# Sources of oversized dead letters kept to recognise them when their batch is redone.
MAX_OVERSIZED_REMEMBERED = 10_000
# How long a send for a partition the producer does not know waits for fresh metadata.
METADATA_WAIT_S = 5.0


class Producer:
    """One kafka-python producer at a time (`kafka`), and the waits around it.

    `stop` ends the wait for the first producer (SIGTERM at start-up: nothing is in
    hand). `abandon` ends every later wait and retry: the shutdown deadline, so a
    checkpoint in progress at SIGTERM keeps trying until then (`within` bounds it
    further). `beat` is called while waiting on Kafka (the liveness probe).
    A transactional producer's refusals of a record raise (its transaction aborts);
    a plain one's fail that record's future.
    """

    def __init__(
        self,
        settings: Settings,
        make: Callable[[], RecordProducer],
        *,
        transactional: bool,
        stop: threading.Event,
        abandon: threading.Event,
        beat: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.make = make
        self.transactional = transactional
        self.abandon = abandon
        self.beat = beat
        # Input partition p's outputs go to partition p of the output and dead-letter
        # topics (set by the run loop when their partition counts equal the input's).
        self.same_partitions = False
        # Sources (partition, offset) of dead letters the topic refused for their size
        # (see `note_oversized`).
        self._oversized: set[tuple[int, int]] = set()
        self.kafka = self._new(stop)

    # -- the producer's life -------------------------------------------------------
    def _new(self, stop: threading.Event) -> RecordProducer:
        """A producer ready to send, waiting out a cluster that does not answer yet.

        Building one bootstraps (and, transactional, finds the transaction
        coordinator and fences this id's previous producer): during a broker
        outage both time out, which is a reason to wait, not to exit.
        """
        backoff = Backoff(stop, beat=self.beat)
        while True:
            if stop.is_set():
                # Past the shutdown deadline (or SIGTERM at start-up) a producer would
                # not be used: building one may wait for the cluster (librdkafka's
                # init_transactions waits MAX_BLOCK_MS), past the deadline.
                raise DeliveryFailed("no producer built: asked to stop")
            producer: RecordProducer | None = None
            try:
                producer = self.make()
                if self.transactional:
                    producer.init_transactions()
                return producer
            except KafkaError as exc:
                if producer is not None:
                    producer.close(0)
                if isinstance(exc, AuthorizationError):
                    raise not_authorized(self.settings, exc) from None
                log.warning("producer_unavailable", error=str(exc), retry_in_s=backoff.delay)
                if backoff.wait():
                    raise DeliveryFailed(f"no producer at shutdown: {exc}") from exc

    def build(self) -> None:
        """A new producer in place of the closed one, waiting for the cluster until
        the shutdown deadline (DeliveryFailed then)."""
        self.kafka = self._new(self.abandon)

    def renew(self) -> None:
        """Replace the producer. kafka-python 3.0.12's sender spins on a core while it
        holds records for a partition without a leader (a deleted topic, a broker
        gone), and a transactional producer whose transaction the coordinator timed
        out is fenced for good: drop it (what it still holds fails) and start anew."""
        self.close(0)
        self.build()

    def close(self, timeout: float) -> None:
        self.kafka.close(timeout)

    def flush(self) -> None:
        """Wait for every acknowledgement, up to FLUSH_TIMEOUT_S, in one-second slices
        that beat the liveness probe and give up at the shutdown deadline."""
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while True:
            try:
                self.kafka.flush(timeout=1.0)
                return
            except KafkaTimeoutError:
                self.beat()
                if self.abandon.is_set() or time.monotonic() >= deadline:
                    raise

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

    # -- sending ---------------------------------------------------------------------
    def send(self, records: Sequence[Record]) -> Sent:
        """Send each record; what the client refuses for one record is that record's
        failed future (a transactional send raises instead: the transaction aborts and
        the batch is recomputed). Never an exception out of the loop for one record."""
        sent: Sent = []
        refused: KafkaError | None = None
        for item in records:
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

    def _send_one(self, item: Record) -> tuple[Record, Future]:
        """Send one record; a dead letter the client refuses (too large, or any error of
        its own) is sent smaller (`OutputRecord.without_value`), down to the daemon's
        headers alone, which always go: a dead letter can always be sent."""
        if isinstance(item, StateRecord):
            topic = self.settings.state_topic
            return item, self.send_to(topic, item.partition, key=item.wire_key, value=item.value)
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

    def _send_output(self, item: OutputRecord) -> Future:
        return self.send_to(
            self.topic(item),
            # Stable key -> partition and no murmur2 per record, when the counts agree
            # (the shadow topic's count is not watched: by key).
            item.partition if self.same_partitions and item.kind is not Kind.SHADOW else None,
            key=item.key,
            value=item.value,
            headers=item.headers or None,
        )

    def send_to(self, topic: str, partition: int | None, **record: Any) -> Future:
        """`producer.send`, through a partition added to the topic since the producer
        last refreshed its metadata: that refusal forces a refresh, then the record goes
        there. A partition the topic still lacks means an output topic with fewer
        partitions than the input: outputs go by key from now on (the run loop sets
        `same_partitions` again once the counts agree). A state record for it fails
        (retried; the run loop serves no input partition the state topic lacks)."""
        try:
            return self.kafka.send(topic, partition=partition, **record)
        except ValueError:
            if partition is None or not unlisted(self.kafka, topic, partition):
                raise  # another refusal, e.g. neither key nor value
        self.kafka.refresh_metadata(METADATA_WAIT_S)
        if not unlisted(self.kafka, topic, partition):
            return self.kafka.send(topic, partition=partition, **record)
        if topic == self.settings.state_topic:
            raise UnknownTopicOrPartitionError(f"{topic} has no partition {partition}")
        self.same_partitions = False
        log.warning(
            "outputs_by_key", topic=topic, partition=partition, reason="the topic lacks the partition"
        )
        return self.kafka.send(topic, partition=None, **record)

    def topic(self, item: Record) -> str:
        s = self.settings
        if isinstance(item, StateRecord):
            return s.state_topic
        if item.kind is Kind.SHADOW:
            return s.shadow_topic
        return s.dlq_topic if item.dead_letter else s.output_topic

    # -- dead letters too large for the topic ------------------------------------------
    def note_oversized(self, sent: Iterable[tuple[Record, Future]]) -> None:
        """Remember the dead letters the topic refused for their size: whenever they
        are sent again (resent, or recomputed after an abort), `send` leaves their
        value out. Retrying one unchanged would block its partition forever."""
        oversized = {
            (item.partition, item.offset)
            for item, f in sent
            if isinstance(item, OutputRecord) and _refused_as_too_large(item, f)
        }
        if oversized:
            if len(self._oversized) > MAX_OVERSIZED_REMEMBERED:
                self._oversized.clear()  # older ones were long recomputed and sent
            self._oversized |= oversized


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
