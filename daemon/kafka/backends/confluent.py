"""The confluent-kafka (librdkafka) backend of the Kafka client port (`daemon.kafka.port`).

librdkafka does in C what kafka-python does in Python per record (fetch parsing,
batching, checksums), so the loop's Kafka side costs a fraction of the CPU. It is the
optional extra `lstmd[librdkafka]`, chosen with `LSTMD_KAFKA_CLIENT=confluent-kafka`;
confluent-kafka is imported in this module only.

Every setting means what it means for the kafka-python clients (daemon/kafka/clients.py,
whose constants are reused here, so the two never drift apart); this module maps
them to librdkafka's names and makes librdkafka speak the port's vocabulary:

* Futures: librdkafka reports deliveries only from inside `poll()`/`flush()` on the
  caller's thread. The daemon never calls anything to learn an acknowledgement (it
  looks at `future.is_done` between its own steps), so a thread of the producer's
  polls (`_Poller`), as kafka-python's IO thread does.
* Errors: a broker's error carries Kafka's protocol code, so it becomes
  `kafka.errors.for_code(code)`; librdkafka's local (negative) codes are mapped by
  hand (`translate`). The group moving on is CommitFailedError or
  RebalanceInProgressError, as kafka-python raises them from a commit.
* Bounds: librdkafka's close, commit and metadata calls would wait for as long as
  their own timeouts say (a minute and more during an outage): each is bounded here.

Where librdkafka's meaning differs from kafka-python's, the method says so.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, cast

import kafka.errors as errors
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import KafkaError as RdError
from confluent_kafka import TopicPartition as RdPartition
from kafka.producer.future import RecordMetadata

from daemon import __version__
from daemon.config import Settings
from daemon.kafka import port
from daemon.kafka.clients import (
    MAX_BLOCK_MS,
    METADATA_MAX_AGE_MS,
    PRODUCER_BATCH_BYTES,
    PRODUCER_LINGER_MS,
    RECONNECT_BACKOFF_MAX_MS,
    RESTORE_FETCH_BYTES,
    TRANSACTION_TIMEOUT_MS,
    max_message_bytes,
)
from daemon.kafka.port import Future, Polled, RebalanceEvents, TopicPartition
from daemon.ops.logs import get_logger

log = get_logger(__name__)

# The port's headers as confluent-kafka's stubs spell them (a list is invariant).
_Headers = list[tuple[str, str | bytes | None]]

# kafka-python's delivery timeout (its default, 2 minutes), which delivery's waits and
# logs assume (daemon/streaming/delivery/producer.py); librdkafka's default is 5. A
# transactional producer's is its transaction timeout instead: librdkafka requires
# message.timeout.ms <= transaction.timeout.ms.
DELIVERY_TIMEOUT_MS = 120_000
# Why a commit queued behind a revocation's was cancelled (ConfluentConsumer._on_revoke).
SUPERSEDED = "superseded by a revocation's commit"
# The producer's poller thread serves delivery reports this often at the least
# (poll returns at once when a report is ready: this is only the idle wake-up).
POLL_INTERVAL_S = 0.1
# Transaction calls wait for the coordinator in slices of this, beating liveness.
TRANSACTION_SLICE_S = 0.5
# librdkafka's own log lines at and above warning go to the daemon's log (syslog
# levels: 4 is warning); its connection chatter at info does not.
LIBRDKAFKA_LOG_LEVEL = 4

# librdkafka's local error codes and what kafka-python raises in their place.
_LOCAL: dict[int, type[Exception]] = {
    RdError._TIMED_OUT: errors.KafkaTimeoutError,
    RdError._MSG_TIMED_OUT: errors.KafkaTimeoutError,
    RdError._TIMED_OUT_QUEUE: errors.KafkaTimeoutError,
    RdError._QUEUE_FULL: errors.KafkaTimeoutError,
    # Abandoned by close() (purged): kafka-python's force-close fails them likewise.
    RdError._PURGE_QUEUE: errors.KafkaTimeoutError,
    RdError._PURGE_INFLIGHT: errors.KafkaTimeoutError,
    RdError._TRANSPORT: errors.KafkaConnectionError,
    RdError._ALL_BROKERS_DOWN: errors.KafkaConnectionError,
    RdError._RESOLVE: errors.KafkaConnectionError,
    RdError._SSL: errors.KafkaConnectionError,
    RdError._DESTROY: errors.KafkaConnectionError,
    RdError._AUTHENTICATION: errors.SaslAuthenticationFailedError,
    RdError._FENCED: errors.ProducerFencedError,
    RdError._UNKNOWN_PARTITION: errors.UnknownTopicOrPartitionError,
    RdError._UNKNOWN_TOPIC: errors.UnknownTopicOrPartitionError,
    RdError._WAIT_COORD: errors.CoordinatorNotAvailableError,
    RdError._ASSIGNMENT_LOST: errors.CommitFailedError,
    RdError._MAX_POLL_EXCEEDED: errors.CommitFailedError,
    RdError._STATE: errors.IllegalStateError,
    RdError._BAD_MSG: errors.CorruptRecordError,
    RdError._BAD_COMPRESSION: errors.UnsupportedCodecError,
}
# The group moved on: what kafka-python's commit raises for these broker codes.
_COMMIT: dict[int, type[Exception]] = {
    RdError.ILLEGAL_GENERATION: errors.CommitFailedError,
    RdError.UNKNOWN_MEMBER_ID: errors.CommitFailedError,
    RdError._ASSIGNMENT_LOST: errors.CommitFailedError,
    RdError.REBALANCE_IN_PROGRESS: errors.RebalanceInProgressError,
}
# Codes after which this consumer is no member of the group's current generation.
_EXPELLED = frozenset(
    {
        RdError.ILLEGAL_GENERATION,
        RdError.UNKNOWN_MEMBER_ID,
        RdError.FENCED_INSTANCE_ID,
        RdError._ASSIGNMENT_LOST,
        RdError._MAX_POLL_EXCEEDED,
    }
)


# librdkafka reports a fatal error as _FATAL with its cause in the text only (the Python
# binding has no rd_kafka_fatal_error()): the causes the daemon tells apart, found by
# librdkafka's own description of each (a static member fenced by another with its
# group.instance.id ended the daemon with exit 1 instead of 2 naming the variable).
_FATAL_CAUSES = (
    RdError.FENCED_INSTANCE_ID,
    RdError.PRODUCER_FENCED,
    RdError.INVALID_PRODUCER_EPOCH,
    RdError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    RdError._FENCED,
)


def translate(error: RdError, *, commit: bool = False) -> Exception:
    """librdkafka's error as the kafka-python exception the daemon tells apart."""
    code = error.code()
    text = f"{error.name()}: {error.str()}"
    if code == RdError._FATAL:
        code = next((c for c in _FATAL_CAUSES if RdError(c).str() in text), code)
    cls = (_COMMIT.get(code) if commit else None) or _LOCAL.get(code)
    if cls is not None:
        return cls(text)
    if code >= 0:
        broker: type[Exception] = errors.for_code(code)  # type: ignore[no-untyped-call]
        return broker(text)
    exc = errors.KafkaError(text)  # another local code: its retriability is librdkafka's
    exc.retriable = error.retriable()
    return exc


def _raised(exc: KafkaException, *, commit: bool = False) -> Exception:
    error = exc.args[0] if exc.args else None
    if isinstance(error, RdError):
        return translate(error, commit=commit)
    return errors.KafkaError(str(exc))


@contextlib.contextmanager
def _translated(*, commit: bool = False) -> Iterator[None]:
    try:
        yield
    except KafkaException as exc:
        raise _raised(exc, commit=commit) from exc


# -- configuration -----------------------------------------------------------------------
def common_config(settings: Settings) -> dict[str, Any]:
    """Connection and security settings shared by every client (clients.security_kwargs
    in librdkafka's names); the password never leaves here."""
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(settings.bootstrap_servers),
        "client.id": f"lstmd-{__version__}",
        "security.protocol": settings.kafka_security_protocol,
        "reconnect.backoff.max.ms": RECONNECT_BACKOFF_MAX_MS,
        # kafka-python's metadata_max_age_ms: partitions added to a topic are seen on it.
        "topic.metadata.refresh.interval.ms": METADATA_MAX_AGE_MS,
        "logger": logging.getLogger("librdkafka"),
        "log_level": LIBRDKAFKA_LOG_LEVEL,
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.sasl_password()
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        for name, key in (
            ("cafile", "ssl.ca.location"),
            ("certfile", "ssl.certificate.location"),
            ("keyfile", "ssl.key.location"),
        ):
            path = getattr(settings, f"kafka_ssl_{name}")
            if path is not None:
                config[key] = str(path)
    return config


def consumer_config(settings: Settings) -> dict[str, Any]:
    """kafka_python.make_consumer's settings. max.poll.records has no librdkafka setting:
    `poll` asks `consume` for at most that many records."""
    config = {
        **common_config(settings),
        "group.id": settings.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Upstream producers may be transactional: never feed an aborted event to a state.
        "isolation.level": "read_committed",
        "allow.auto.create.topics": False,
        "max.poll.interval.ms": settings.kafka_max_poll_interval_ms,
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": settings.kafka_heartbeat_interval_ms,
        "partition.assignment.strategy": "cooperative-sticky",
        "enable.partition.eof": False,
    }
    if settings.group_instance_id is not None:
        config["group.instance.id"] = settings.group_instance_id
    return config


def reader_config(settings: Settings) -> dict[str, Any]:
    """The readers' settings (kafka_python.make_reader's). librdkafka insists on a group
    id even for a consumer that only assigns: this one never joins it and never commits."""
    return {
        **common_config(settings),
        "group.id": f"{settings.group_id}.reader",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "allow.auto.create.topics": False,
        "enable.partition.eof": False,
        "max.partition.fetch.bytes": RESTORE_FETCH_BYTES,
    }


def producer_config(settings: Settings, transactional_id: str | None) -> dict[str, Any]:
    """kafka_python.make_producer's settings. librdkafka never blocks in produce() (its
    queue full is a BufferError: `send` retries it for up to clients.MAX_BLOCK_MS)."""
    config: dict[str, Any] = {
        **common_config(settings),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": PRODUCER_LINGER_MS,
        "batch.size": PRODUCER_BATCH_BYTES,
        "message.max.bytes": max_message_bytes(settings),
        "compression.type": settings.kafka_compression,
        "message.timeout.ms": DELIVERY_TIMEOUT_MS,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
        config["transaction.timeout.ms"] = TRANSACTION_TIMEOUT_MS
        config["message.timeout.ms"] = TRANSACTION_TIMEOUT_MS
    return config


# -- records -----------------------------------------------------------------------------
class Record(NamedTuple):
    """A record read: the fields of daemon.core.records.InputRecord."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


def _ours(tp: RdPartition) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _theirs(tp: TopicPartition, offset: int = OFFSET_INVALID) -> RdPartition:
    return RdPartition(tp.topic, tp.partition, offset)


def _seconds(timeout_ms: int) -> float:
    return max(0.0, timeout_ms / 1000.0)


class _Reading:
    """What the group consumer and the reader share: polling into the port's shape,
    positions, offsets of the log, close within a bound."""

    def __init__(self, consumer: Consumer, max_records: int) -> None:
        self._consumer = consumer
        self._max_records = max_records
        # Where a seek sent a partition: librdkafka reports no position (-1001) from a
        # seek until the partition's next fetch, kafka-python reports the target.
        self._sought: dict[TopicPartition, int | None] = {}  # None: its beginning
        self._pending_error: BaseException | None = None
        self._closed = False

    # -- assignment (by hand) -----------------------------------------------------------
    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        """Assign exactly `partitions`, incrementally: partitions kept go on from where
        they are (librdkafka's assign() would restart every one of them, kafka-python's
        keeps their positions); new ones start at their beginning, or where a seek said."""
        wanted, current = set(partitions), self.assignment()
        gone, new = current - wanted, wanted - current
        with _translated():
            if gone:
                self._consumer.incremental_unassign([_theirs(tp) for tp in gone])
            if new:
                self._consumer.incremental_assign([_theirs(tp, self._start(tp)) for tp in new])
        for tp in gone:
            self._sought.pop(tp, None)

    def _start(self, tp: TopicPartition) -> int:
        offset = self._sought.get(tp)
        return OFFSET_BEGINNING if offset is None else offset

    def assignment(self) -> set[TopicPartition]:
        return {_ours(tp) for tp in self._consumer.assignment()}

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._seek(partition, offset)

    def seek_to_beginning(self, partition: TopicPartition) -> None:
        self._seek(partition, None)

    def _seek(self, partition: TopicPartition, offset: int | None) -> None:
        """librdkafka refuses a seek on a partition it is not fetching yet (_STATE, e.g.
        just assigned): that partition is assigned again, starting at the offset."""
        self._sought[partition] = offset
        target = OFFSET_BEGINNING if offset is None else offset
        try:
            self._consumer.seek(_theirs(partition, target))
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not isinstance(error, RdError) or error.code() != RdError._STATE:
                raise _raised(exc) from exc
            if partition not in self.assignment():
                raise errors.IllegalStateError(f"seek on {partition}, which is not assigned") from exc
            with _translated():
                self._consumer.incremental_unassign([_theirs(partition)])
                self._consumer.incremental_assign([_theirs(partition, target)])

    # -- offsets -----------------------------------------------------------------------
    def position(self, partition: TopicPartition, timeout_ms: int) -> int | None:
        """The next offset to read: librdkafka's, else a seek's target, else the
        beginning of the log for a partition that reads from there (asked within
        `timeout_ms`); None when not known."""
        with _translated():
            (tp,) = self._consumer.position([_theirs(partition)])
        if tp.offset >= 0:
            self._sought.pop(partition, None)
            return int(tp.offset)
        if partition in self._sought:
            sought = self._sought[partition]
            if sought is not None:
                return sought
        elif (committed := self._committed_for_position(partition, timeout_ms)) is not None:
            return committed
        try:
            return self.beginning_offsets([partition], timeout_ms)[partition]
        except errors.KafkaError:
            return None

    def _committed_for_position(self, partition: TopicPartition, timeout_ms: int) -> int | None:
        return None  # a reader has no group: it starts at the beginning

    def _watermarks(
        self, partitions: Sequence[TopicPartition], timeout_ms: int
    ) -> dict[TopicPartition, tuple[int, int]]:
        """Each partition's (first, last stable) offsets, one request each, all within
        `timeout_ms` (KafkaTimeoutError past it). For read_committed, librdkafka's
        ListOffsets asks for the last stable offset, as kafka-python's end_offsets."""
        deadline = time.monotonic() + _seconds(timeout_ms)
        out: dict[TopicPartition, tuple[int, int]] = {}
        for tp in partitions:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.KafkaTimeoutError(f"offsets of {tp} not answered in {timeout_ms} ms")
            with _translated():
                low, high = self._consumer.get_watermark_offsets(_theirs(tp), timeout=left)
            out[tp] = (int(low), int(high))
        return out

    def beginning_offsets(
        self, partitions: Sequence[TopicPartition], timeout_ms: int
    ) -> dict[TopicPartition, int]:
        return {tp: low for tp, (low, _) in self._watermarks(partitions, timeout_ms).items()}

    def end_offsets(self, partitions: Sequence[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        return {tp: high for tp, (_, high) in self._watermarks(partitions, timeout_ms).items()}

    # -- reading -----------------------------------------------------------------------
    def poll(self, timeout_ms: int, max_records: int | None = None) -> Polled:
        """Records by partition, in offset order. A message carrying an error: partition
        EOF is ignored; another is raised (translated), after the records polled with
        it are returned (librdkafka's position is past them already)."""
        self._raise_pending()
        wanted = max_records or self._max_records
        with _translated():
            # librdkafka's consume waits until it has `wanted` records or the timeout
            # passed (kafka-python's poll returns with what has arrived): at a low rate
            # every poll would wait its whole timeout. Wait for the first record only,
            # then take what is already fetched without waiting.
            messages = self._consumer.consume(1, _seconds(timeout_ms))
            if messages and wanted > 1:
                messages += self._consumer.consume(wanted - 1, 0)
        if not messages:  # an error a rebalance callback met within this consume
            self._raise_pending()
        polled: dict[TopicPartition, list[Record]] = {}
        failure: Exception | None = None
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != RdError._PARTITION_EOF and failure is None:
                    failure = self._failed(error)
                continue
            record = _record(message)
            tp = TopicPartition(record.topic, record.partition)
            polled.setdefault(tp, []).append(record)
        if failure is not None:
            if not polled:
                raise failure
            self._pending_error = self._pending_error or failure
        return polled

    def _raise_pending(self) -> None:
        """An error held back for this poll (a rebalance callback's, or one that came
        with records already returned), raised once."""
        if self._pending_error is not None:
            pending, self._pending_error = self._pending_error, None
            raise pending

    def _failed(self, error: RdError) -> Exception:
        return translate(error)

    def close(self, timeout_ms: int) -> None:
        """librdkafka's close has no timeout (it waits to leave the group, and for the
        revocation callback): it runs on a thread of its own, waited for `timeout_ms`;
        past that the process goes on and the thread finishes (or not) on its own."""
        if self._closed:
            return
        self._closed = True
        closer = threading.Thread(target=self._consumer.close, name="librdkafka-close", daemon=True)
        closer.start()
        closer.join(_seconds(timeout_ms))
        if closer.is_alive():
            log.warning("kafka_close_slow", client="consumer", timeout_ms=timeout_ms)


def _record(message: Message) -> Record:
    # topic, partition and offset are set on every message that carries no error.
    return Record(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        timestamp=message.timestamp()[1],
        key=message.key(),
        value=message.value(),
        headers=list(message.headers() or ()),  # type: ignore[arg-type]
    )


class ConfluentReader(_Reading):
    """The port's Reader: partitions by assignment, no group, read_committed."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(Consumer(reader_config(settings)), settings.kafka_max_poll_records)


class ConfluentConsumer(_Reading):
    """The port's GroupConsumer: the group member reading the input topic."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(Consumer(consumer_config(settings)), settings.kafka_max_poll_records)
        self._paused: set[TopicPartition] = set()
        self._member = False
        self._events: RebalanceEvents | None = None
        # Commits, synchronous or not, go through one thread in submission order, so a
        # commit given up on (its wait bounded) can never land after a later one.
        self._committer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="librdkafka-commit")
        self._queued: set[concurrent.futures.Future[None]] = set()  # submitted, not done

    # -- the group -----------------------------------------------------------------------
    def subscribe(self, topic: str, events: RebalanceEvents) -> None:
        """Join the group. librdkafka calls the callbacks from within `poll` (or `close`)
        on the caller's thread. Each callback applies its incremental assignment change
        itself and never raises (`_callback` says why)."""
        self._events = events
        with _translated():
            self._consumer.subscribe(
                [topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )

    def _on_assign(self, consumer: Consumer, partitions: list[RdPartition]) -> None:
        with self._callback(consumer.incremental_assign, partitions):
            self._member = True
            assert self._events is not None
            self._events.assign(_ours(tp) for tp in partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[RdPartition]) -> None:
        """A planned revocation: checkpointed, and its offsets committed synchronously
        here, within the generation that revoked the partitions (`RebalanceEvents` in port.py says why)."""
        with self._callback(consumer.incremental_unassign, partitions):
            assert self._events is not None
            revoked = {_ours(tp) for tp in partitions}
            offsets = self._events.checkpoint(revoked)
            if offsets:
                # On this thread: librdkafka serves no commit of another thread while the
                # rebalance waits for this callback (through the committer, every one was
                # "not answered in 5000 ms", measured), and commits from within it as
                # documented; its wait is bounded by its request timeouts. Commits queued
                # and not started are cancelled (they would land after this one, older).
                for queued in list(self._queued):
                    queued.cancel()
                try:
                    self._commit_now(offsets)
                except errors.KafkaError as exc:  # the next owner repeats from the last commit
                    log.warning("revocation_commit_failed", error=str(exc), cause=type(exc).__name__)
            self._paused -= revoked
            self._events.revoke(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[RdPartition]) -> None:
        with self._callback(consumer.incremental_unassign, partitions):
            self._member = False
            assert self._events is not None
            lost = {_ours(tp) for tp in partitions}
            self._paused -= lost
            self._events.lose(lost)

    @contextlib.contextmanager
    def _callback(
        self, change: Callable[[list[RdPartition]], None], partitions: list[RdPartition]
    ) -> Iterator[None]:
        """A rebalance callback's body, then its assignment change, whatever the body
        did. Nothing may leave a callback: confluent-kafka would then apply the change
        itself, and its fallback first asks librdkafka for the rebalance protocol, a
        call that can wait forever (librdkafka#4041, once the consumer is closing; a
        consumer was also seen stuck inside `consume` for a minute during a broker
        outage at SIGTERM) with the GIL held. What the body raised is raised by the
        `poll` that ran it, after the change is made."""
        try:
            yield
        except BaseException as exc:  # raised again by poll, in order
            if self._pending_error is None:
                self._pending_error = exc
        finally:
            try:
                change(partitions)
            except Exception as exc:  # the change is librdkafka's to retry
                log.warning("rebalance_change_failed", change=change.__name__, error=str(exc))

    def member(self) -> bool:
        """librdkafka exposes no generation, so membership is tracked from what it
        reports: True from an assignment on, False once the assignment is lost (session
        expired, fenced), max.poll.interval.ms is exceeded, or a commit meets a stale
        generation. The limit: an expulsion librdkafka has not noticed yet (no
        heartbeat answered since) still reads True, and a member whose assignment
        was empty when it was expelled gets no on_lost to tell it."""
        return self._member and not self._closed

    def _failed(self, error: RdError) -> Exception:
        if error.code() in _EXPELLED:
            self._member = False
        return translate(error)

    def group_metadata(self) -> Any:
        return self._consumer.consumer_group_metadata()

    def partitions_for_topic(self, topic: str, timeout_ms: int) -> set[int]:
        """One Metadata request for the topic, waited for `timeout_ms` (empty: not known)."""
        try:
            metadata = self._consumer.list_topics(topic, timeout=_seconds(timeout_ms))
        except KafkaException:
            return set()
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            return set()
        return set(found.partitions)

    # -- positions -----------------------------------------------------------------------
    def _committed_for_position(self, partition: TopicPartition, timeout_ms: int) -> int | None:
        try:
            return self.committed(partition, timeout_ms)
        except errors.KafkaError:
            return None

    def committed(self, partition: TopicPartition, timeout_ms: int) -> int | None:
        with _translated():
            (tp,) = self._consumer.committed([_theirs(partition)], timeout=_seconds(timeout_ms))
        if tp.error is not None:
            raise translate(tp.error)
        return int(tp.offset) if tp.offset >= 0 else None

    def highwater(self, partition: TopicPartition) -> int | None:
        """The high watermark the last fetch response carried (librdkafka's cached
        watermark: no request), as kafka-python's highwater, not the stable offset."""
        with _translated():
            _, high = self._consumer.get_watermark_offsets(_theirs(partition), cached=True)
        return int(high) if high >= 0 else None

    # -- flow --------------------------------------------------------------------------
    def pause(self, *partitions: TopicPartition) -> None:
        with _translated():
            self._consumer.pause([_theirs(tp) for tp in partitions])
        self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        with _translated():
            self._consumer.resume([_theirs(tp) for tp in partitions])
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        """librdkafka keeps no paused set to ask: the partitions paused and still
        assigned, as kafka-python reports them."""
        return self._paused & self.assignment()

    # -- commits -------------------------------------------------------------------------
    def _commit_now(self, offsets: Mapping[TopicPartition, int]) -> None:
        try:
            result = self._consumer.commit(
                offsets=[_theirs(tp, offset) for tp, offset in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:
            raise self._commit_error(exc) from exc
        for tp in result or ():
            if tp.error is not None:
                raise self._commit_error(KafkaException(tp.error))

    def _commit_error(self, exc: KafkaException) -> Exception:
        error = exc.args[0] if exc.args else None
        if isinstance(error, RdError) and error.code() in _EXPELLED:
            self._member = False
        return _raised(exc, commit=True)

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        """Commit synchronously, waited for `timeout_ms` (librdkafka's own wait has no
        bound but its request timeouts): KafkaTimeoutError past it."""
        pending = self._submit(offsets)
        try:
            pending.result(timeout=_seconds(timeout_ms))
        except concurrent.futures.TimeoutError:
            raise errors.KafkaTimeoutError(f"commit not answered in {timeout_ms} ms") from None
        except concurrent.futures.CancelledError:
            raise errors.CommitFailedError(SUPERSEDED) from None

    def commit_async(self, offsets: Mapping[TopicPartition, int]) -> Future:
        """librdkafka's own asynchronous commit reports only from within `poll`: this one
        is its synchronous commit on the committer thread, whose future the thread
        resolves."""
        future = Future()
        self._submit(offsets).add_done_callback(functools.partial(_resolve, future))
        return future

    def _submit(self, offsets: Mapping[TopicPartition, int]) -> concurrent.futures.Future[None]:
        pending = self._committer.submit(self._commit_now, dict(offsets))
        self._queued.add(pending)
        pending.add_done_callback(self._queued.discard)
        return pending

    def close(self, timeout_ms: int) -> None:
        """Leave the group (a static member stays until its session times out). The
        revocation callback runs within (on the closing thread, while the caller waits)."""
        if self._closed:
            return
        super().close(timeout_ms)
        self._committer.shutdown(wait=False, cancel_futures=True)


def _resolve(future: Future, done: concurrent.futures.Future[None]) -> None:
    if done.cancelled():
        future.failure(errors.CommitFailedError(SUPERSEDED))
        return
    exc = done.exception()
    if exc is None:
        future.success(None)
    else:
        future.failure(exc)


# -- producing -----------------------------------------------------------------------------
class ConfluentProducer:
    """The port's RecordProducer: idempotent (acks=all), transactional with an id."""

    def __init__(self, settings: Settings, transactional_id: str | None) -> None:
        self._producer = Producer(producer_config(settings, transactional_id))
        # The topics' partitions as last seen, for `partitions` (no request): librdkafka
        # keeps its metadata to itself.
        self._known: dict[str, set[int] | None] = {}
        self._known_lock = threading.Lock()
        self._closing = threading.Event()
        self._wake_metadata = threading.Event()
        self._poller = threading.Thread(target=self._poll_forever, name="librdkafka-poll", daemon=True)
        self._watcher = threading.Thread(target=self._watch_metadata, name="librdkafka-meta", daemon=True)
        self._poller.start()
        self._watcher.start()

    def _poll_forever(self) -> None:
        """Serve delivery reports as they come, so that futures are done without the
        daemon calling anything (librdkafka runs them only inside poll or flush)."""
        while not self._closing.is_set():
            self._producer.poll(POLL_INTERVAL_S)

    def _watch_metadata(self) -> None:
        """Refresh the partitions of the topics asked about, every METADATA_MAX_AGE_MS
        and at once for a topic asked about the first time."""
        while not self._closing.is_set():
            self._refresh(METADATA_MAX_AGE_MS / 1000.0)
            self._wake_metadata.wait(METADATA_MAX_AGE_MS / 1000.0)
            self._wake_metadata.clear()

    def _refresh(self, wait_s: float) -> None:
        with self._known_lock:
            topics = list(self._known)
        deadline = time.monotonic() + wait_s
        for topic in topics:
            left = deadline - time.monotonic()
            if left <= 0 or self._closing.is_set():
                return
            try:
                found = self._producer.list_topics(topic, timeout=left).topics.get(topic)
            except KafkaException:
                return  # not answered: the next refresh asks again
            if found is not None and found.error is None:
                with self._known_lock:
                    self._known[topic] = set(found.partitions)

    # -- sending -------------------------------------------------------------------------
    def send(
        self,
        topic: str,
        *,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Future:
        """Queue a record. librdkafka accepts a record with neither key nor value
        (kafka-python raises ValueError for it). Its queue full, delivery reports are
        served and the record tried again, up to clients.MAX_BLOCK_MS."""
        future = Future()
        report = functools.partial(_delivered, future)
        deadline = time.monotonic() + MAX_BLOCK_MS / 1000.0
        while True:
            try:
                self._producer.produce(
                    topic,
                    value,
                    key,
                    partition=-1 if partition is None else partition,
                    on_delivery=report,
                    headers=cast(_Headers, headers),
                )
                return future
            except BufferError:
                if time.monotonic() >= deadline:
                    raise errors.KafkaTimeoutError(
                        f"the producer's queue stayed full for {MAX_BLOCK_MS} ms"
                    ) from None
                self._producer.poll(POLL_INTERVAL_S)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if isinstance(error, RdError) and error.code() == RdError._UNKNOWN_PARTITION:
                    raise ValueError(f"{topic} has no partition {partition} (as far as known)") from exc
                raise _raised(exc) from exc

    def flush(self, timeout: float) -> None:
        try:
            left = self._producer.flush(max(0.0, timeout))
        except KafkaException as exc:  # e.g. a fatal transactional error
            raise _raised(exc) from exc
        if left:
            raise errors.KafkaTimeoutError(f"{left} records not acknowledged in {timeout} s")

    def close(self, timeout: float) -> None:
        """Flush for `timeout`, then purge what is left: its futures fail
        (KafkaTimeoutError), as kafka-python's force-close fails them. Never raises: a
        producer in a fatal state (librdkafka raises from `flush` then) is closed all
        the same, which is what delivery closes it for."""
        if self._closing.is_set():
            return
        try:
            left = self._producer.flush(max(0.0, timeout))
        except KafkaException as exc:
            log.warning("producer_closed_failed", error=str(exc))
            left = len(self._producer)
        if left:
            log.warning("producer_closed_unacknowledged", records=left, timeout_s=timeout)
            with contextlib.suppress(KafkaException):
                self._producer.purge(in_queue=True, in_flight=True, blocking=False)
                self._producer.poll(0)  # the purged records' reports: their futures fail
        self._closing.set()
        self._wake_metadata.set()
        self._poller.join(2 * POLL_INTERVAL_S)

    # -- metadata ------------------------------------------------------------------------
    def partitions(self, topic: str) -> set[int] | None:
        with self._known_lock:
            if topic in self._known:
                known = self._known[topic]
                return set(known) if known is not None else None
            self._known[topic] = None
        self._wake_metadata.set()
        return None

    def refresh_metadata(self, wait_s: float) -> None:
        self._refresh(wait_s)

    # -- transactions ----------------------------------------------------------------------
    def init_transactions(self) -> None:
        """Waits clients.MAX_BLOCK_MS for the coordinator, as kafka-python's; librdkafka
        lets a timed-out call be made again."""
        with _translated():
            self._producer.init_transactions(MAX_BLOCK_MS / 1000.0)

    def begin_transaction(self) -> None:
        with _translated():
            self._producer.begin_transaction()

    def send_offsets_to_transaction(
        self,
        offsets: Mapping[TopicPartition, int],
        group: Any,
        abandon: threading.Event,
        beat: Callable[[], None],
    ) -> None:
        positions = [_theirs(tp, offset) for tp, offset in offsets.items()]
        self._in_slices(
            "offsets",
            lambda s: self._producer.send_offsets_to_transaction(positions, group, s),
            abandon,
            beat,
        )

    def commit_transaction(self, abandon: threading.Event, beat: Callable[[], None]) -> None:
        self._in_slices("commit", self._producer.commit_transaction, abandon, beat)

    def abort_transaction(self, abandon: threading.Event, beat: Callable[[], None]) -> None:
        self._in_slices("abort", self._producer.abort_transaction, abandon, beat)

    def _in_slices(
        self, what: str, call: Callable[[float], object], abandon: threading.Event, beat: Callable[[], None]
    ) -> None:
        """Make the call with a timeout of one slice, again while it times out (librdkafka
        resumes a timed-out transaction call), beating liveness between slices; give up
        (KafkaTimeoutError) when `abandon` is set or after TRANSACTION_CALL_TIMEOUT_S."""
        deadline = time.monotonic() + port.TRANSACTION_CALL_TIMEOUT_S
        while True:
            try:
                call(TRANSACTION_SLICE_S)
                return
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                timed_out = isinstance(error, RdError) and error.code() == RdError._TIMED_OUT
                if not timed_out:
                    raise _raised(exc) from exc
            beat()
            if abandon.is_set() or time.monotonic() > deadline:
                raise errors.KafkaTimeoutError(f"transaction {what} not answered by the coordinator")


def _delivered(future: Future, error: RdError | None, message: Message) -> None:
    if error is not None:
        future.failure(translate(error))
        return
    topic, partition = message.topic() or "", message.partition() or 0
    key, value = message.key(), message.value()
    future.success(
        RecordMetadata(
            topic,
            partition,
            TopicPartition(topic, partition),
            message.offset() or 0,
            message.timestamp()[1],
            None,
            len(key) if key is not None else -1,
            len(value) if value is not None else -1,
            -1,
        )
    )


class ConfluentBackend:
    """The port's Backend on confluent-kafka: every client from the same settings."""

    name = "confluent-kafka"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def consumer(self) -> port.GroupConsumer:
        return ConfluentConsumer(self.settings)

    def reader(self) -> port.Reader:
        return ConfluentReader(self.settings)

    def producer(self, transactional_id: str | None) -> port.RecordProducer:
        return ConfluentProducer(self.settings, transactional_id)


# mypy --strict checks that each class plays its role of the port.
_backend: type[port.Backend] = ConfluentBackend
_consumer: type[port.GroupConsumer] = ConfluentConsumer
_reader: type[port.Reader] = ConfluentReader
_producer: type[port.RecordProducer] = ConfluentProducer
