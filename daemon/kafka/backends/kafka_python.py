"""The kafka-python backend of the client port (the default), and the kafka-python
3.0.12 workarounds it needs.

Each port role wraps one kafka-python client; the wrappers add what kafka-python
does not do itself: bounded waits where its calls have none (transaction calls,
`partitions_for_topic`, a producer's close that times out), its metadata read
without a request, and the rebalance listener that commits a revocation's
offsets on its IO thread. The raw clients come from factories, so the unit tests
put the in-memory Kafka (tests/support/kafka.py, kafka-python's API) behind the
same wrappers the daemon runs with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.cluster import ClusterMetadata
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.producer.transaction_manager import TransactionManager
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from daemon.config import Settings
from daemon.kafka.clients import (
    BOOTSTRAP_TIMEOUT_MS,
    MAX_BLOCK_MS,
    METADATA_MAX_AGE_MS,
    PRODUCER_BATCH_BYTES,
    PRODUCER_LINGER_MS,
    RESTORE_FETCH_BYTES,
    TRANSACTION_TIMEOUT_MS,
    compression_type,
    max_message_bytes,
    security_kwargs,
)
from daemon.kafka.port import (
    TRANSACTION_CALL_TIMEOUT_S,
    Future,
    GroupConsumer,
    Polled,
    RebalanceEvents,
    RecordProducer,
    TopicPartition,
)
from daemon.ops.logs import get_logger

log = get_logger("daemon.kafka.listener")


def _committable(offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}


class KafkaPythonConsumer:
    """A kafka-python consumer as the port's `GroupConsumer` (and `Reader`)."""

    def __init__(self, client: KafkaConsumer) -> None:
        self.client = client

    # -- reading -----------------------------------------------------------------
    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self.client.assign(list(partitions))

    def assignment(self) -> set[TopicPartition]:
        return set(self.client.assignment())

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.client.seek(partition, offset)

    def seek_to_beginning(self, partition: TopicPartition) -> None:
        self.client.seek_to_beginning(partition)

    def position(self, partition: TopicPartition, timeout_ms: int) -> int | None:
        return self.client.position(partition, timeout_ms=timeout_ms)

    def beginning_offsets(
        self, partitions: Sequence[TopicPartition], timeout_ms: int
    ) -> dict[TopicPartition, int]:
        return dict(self.client.beginning_offsets(list(partitions), timeout_ms=timeout_ms))

    def end_offsets(self, partitions: Sequence[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        return dict(self.client.end_offsets(list(partitions), timeout_ms=timeout_ms))

    def poll(self, timeout_ms: int, max_records: int | None = None) -> Polled:
        return self.client.poll(timeout_ms=timeout_ms, max_records=max_records)

    # -- the group -----------------------------------------------------------------
    def subscribe(self, topic: str, events: RebalanceEvents) -> None:
        listener = Listener(self.client, events)
        self.client.subscribe([topic], listener=listener)  # type: ignore[arg-type]  # stubs predate the async listener

    def pause(self, *partitions: TopicPartition) -> None:
        self.client.pause(*partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.client.resume(*partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.client.paused())

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.client.highwater(partition)

    def committed(self, partition: TopicPartition, timeout_ms: int) -> int | None:
        return self.client.committed(partition, timeout_ms=timeout_ms)

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        self.client.commit(_committable(offsets), timeout_ms=timeout_ms)

    def commit_async(self, offsets: Mapping[TopicPartition, int]) -> Future:
        """The future of the commit itself: kafka-python's own may be its coordinator
        lookup's (when the coordinator is not known yet), so the answer is taken from
        the commit's callback, which kafka-python runs inside a later `poll`. Commit
        requests go to the coordinator in order on one connection: a synchronous
        commit after this one lands after it."""
        done = Future()

        def answered(_offsets: object, response: object) -> None:
            if done.is_done:
                return
            if isinstance(response, Exception):
                done.failure(response)
            else:
                done.success(None)

        try:
            self.client.commit_async(_committable(offsets), callback=answered)
        except KafkaError as exc:  # e.g. a fenced static member, raised at once
            done.failure(exc)
        return done

    def member(self) -> bool:
        """kafka-python resets the generation when the group expels the member."""
        group: ConsumerGroupMetadata = self.client.group_metadata()  # type: ignore[no-untyped-call]
        return bool(group.generation_id >= 0)

    def group_metadata(self) -> Any:
        return self.client.group_metadata()  # type: ignore[no-untyped-call]

    def partitions_for_topic(self, topic: str, timeout_ms: int) -> set[int]:
        """kafka-python 3.0.12's own `partitions_for_topic` waits for the metadata answer
        without a bound: during an outage it would not see SIGTERM."""
        consumer = self.client
        cluster = getattr(consumer, "_cluster", None)
        net, manager = getattr(consumer, "_net", None), getattr(consumer, "_manager", None)
        if cluster is None or net is None or manager is None:  # another client version
            return set(consumer.partitions_for_topic(topic) or ())
        known = cluster.partitions_for_topic(topic)
        if known:
            return set(known)
        stash = cluster.need_all_topic_metadata
        cluster.need_all_topic_metadata = True
        try:
            net.run(manager.wait_for, cluster.request_update(), timeout_ms)
        except KafkaError:
            pass  # not answered in time: the caller asks again
        finally:
            cluster.need_all_topic_metadata = stash
        return set(cluster.partitions_for_topic(topic) or ())

    def close(self, timeout_ms: int) -> None:
        self.client.close(autocommit=False, timeout_ms=timeout_ms)


class Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """kafka-python's rebalance callbacks, handed to the port's `RebalanceEvents`.

    kafka-python 3 calls listeners on its IO thread, from within `poll()` (or
    `close()`), while the run loop's thread waits in that call. A revocation's
    offsets are committed with the consumer's own asynchronous commit, awaited on
    the IO thread (a blocking `commit()` from that thread would deadlock: kafka-python
    refuses it), within the generation that revoked the partitions, before the next
    JoinGroup. When the coordinator is being looked up, the awaited future is the
    lookup's, not the commit's: the run loop counts those offsets as not yet
    committed all the same, and commits them again if it keeps the partitions.
    """

    def __init__(self, consumer: KafkaConsumer, events: RebalanceEvents) -> None:
        self.consumer = consumer
        self.events = events

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.events.assign(assigned)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        offsets = self.events.checkpoint(set(revoked))
        if offsets:
            try:
                await self.consumer.commit_async(_committable(offsets))
            except KafkaError as exc:  # the next owner repeats from the last commit: harmless
                log.warning("revocation_commit_failed", error=str(exc), cause=type(exc).__name__)
        self.events.revoke(revoked)

    async def on_partitions_lost(self, lost: Any) -> None:
        self.events.lose(lost)


class KafkaPythonProducer:
    """A kafka-python producer as the port's `RecordProducer`."""

    def __init__(self, client: KafkaProducer) -> None:
        self.client = client
        # The hot path: kafka-python's `send` itself, with no call in between.
        self._send = client.send

    def send(
        self,
        topic: str,
        *,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Future:
        return self._send(topic, partition=partition, key=key, value=value, headers=headers)

    def flush(self, timeout: float) -> None:
        self.client.flush(timeout=timeout)

    def close(self, timeout: float) -> None:
        """kafka-python 3.0.12's close() flushes first and raises if that flush times
        out, so it never reaches its own force-close: do that step here."""
        producer = self.client
        try:
            producer.close(timeout=timeout)
        except KafkaTimeoutError:
            sender = getattr(producer, "_sender", None)  # private: no public force-close
            if sender is not None and sender.is_alive():
                sender.force_close()
                sender.join(5.0)
            producer._closed = True  # type: ignore[attr-defined]

    def _metadata(self) -> ClusterMetadata | None:
        """kafka-python's metadata of the producer (private: its public `partitions_for`
        blocks), or None for another client."""
        metadata = getattr(self.client, "_metadata", None)
        return metadata if isinstance(metadata, ClusterMetadata) else None

    def partitions(self, topic: str) -> set[int] | None:
        metadata = self._metadata()
        if metadata is None:
            return None
        known = metadata.partitions_for_topic(topic)  # type: ignore[no-untyped-call]
        if known is None:
            self.client._sender.add_topic(topic)  # type: ignore[attr-defined]  # thread-safe, no wait
            return None
        return set(known)

    def refresh_metadata(self, wait_s: float) -> None:
        metadata = self._metadata()
        if metadata is None:
            return
        done = threading.Event()
        metadata.request_update().add_both(lambda *_: done.set())
        if wait_s:
            done.wait(wait_s)

    # -- transactions ------------------------------------------------------------------
    # kafka-python 3.0.12's send_offsets_to_transaction, commit_transaction and
    # abort_transaction wait for the coordinator without a bound: during a broker
    # outage the daemon would ignore SIGTERM until Kubernetes kills it. These make the
    # same requests and wait in slices, giving up (KafkaTimeoutError) after
    # TRANSACTION_CALL_TIMEOUT_S or when `abandon` is set. A transaction given up on
    # is fenced by the next producer with the same transactional id (the daemon
    # builds one), so nothing is half-committed.
    def init_transactions(self) -> None:
        self.client.init_transactions()

    def begin_transaction(self) -> None:
        self.client.begin_transaction()

    def send_offsets_to_transaction(
        self,
        offsets: Mapping[TopicPartition, int],
        group: Any,
        abandon: threading.Event,
        beat: Callable[[], None],
    ) -> None:
        committable = _committable(offsets)
        manager = self._transaction_manager()
        if manager is None:  # not kafka-python 3.0's producer: its own (unbounded) call
            self.client.send_offsets_to_transaction(committable, group)
            return
        self._await(manager.send_offsets_to_transaction(committable, group), "offsets", abandon, beat)

    def commit_transaction(self, abandon: threading.Event, beat: Callable[[], None]) -> None:
        manager = self._transaction_manager()
        if manager is None:
            self.client.commit_transaction()
            return
        self._await(manager.begin_commit(), "commit", abandon, beat)

    def abort_transaction(self, abandon: threading.Event, beat: Callable[[], None]) -> None:
        manager = self._transaction_manager()
        if manager is None:
            self.client.abort_transaction()
            return
        self._await(manager.begin_abort(), "abort", abandon, beat)

    def _transaction_manager(self) -> Any:
        """kafka-python 3.0's (untyped, private) transaction manager, or None."""
        manager = getattr(self.client, "_transaction_manager", None)
        return manager if isinstance(manager, TransactionManager) else None

    def _await(self, result: Any, what: str, abandon: threading.Event, beat: Callable[[], None]) -> None:
        self.client._sender.wakeup()  # type: ignore[attr-defined]  # as the public calls do
        deadline = time.monotonic() + TRANSACTION_CALL_TIMEOUT_S
        while not result.wait(timeout_ms=500):  # raises the request's error, if any
            beat()
            if abandon.is_set() or time.monotonic() > deadline:
                raise KafkaTimeoutError(f"transaction {what} not answered by the coordinator")


def make_consumer(settings: Settings) -> KafkaConsumer:
    return KafkaConsumer(
        **security_kwargs(settings),
        group_id=settings.group_id,
        group_instance_id=settings.group_instance_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Upstream producers may be transactional: never feed an aborted event to a state.
        isolation_level="read_committed",
        allow_auto_create_topics=False,
        max_poll_records=settings.kafka_max_poll_records,
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        # kafka-python 3 takes assignor instances; its stubs still say classes.
        partition_assignment_strategy=[CooperativeStickyAssignor()],  # type: ignore[list-item]
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


def make_producer(settings: Settings, transactional_id: str | None = None) -> KafkaProducer:
    return KafkaProducer(
        **security_kwargs(settings),
        acks="all",
        enable_idempotence=True,
        linger_ms=PRODUCER_LINGER_MS,
        batch_size=PRODUCER_BATCH_BYTES,
        transactional_id=transactional_id,
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        max_block_ms=MAX_BLOCK_MS,
        max_request_size=max_message_bytes(settings),
        compression_type=compression_type(settings),
        # Building one during an outage waits this long, not kafka-python's 30 s.
        bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


def make_reader(settings: Settings) -> KafkaConsumer:
    """Reads by assignment (no group), committed transactions only."""
    return KafkaConsumer(
        **security_kwargs(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=RESTORE_FETCH_BYTES,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


class KafkaPythonBackend:
    """The port's roles on kafka-python clients. The factories default to the daemon's
    (`make_consumer`, ...); the unit tests give the in-memory Kafka's."""

    name = "kafka-python"

    def __init__(
        self,
        settings: Settings,
        *,
        consumers: Callable[[], KafkaConsumer] | None = None,
        readers: Callable[[], KafkaConsumer] | None = None,
        producers: Callable[[str | None], KafkaProducer] | None = None,
    ) -> None:
        self.settings = settings
        self._consumers = consumers or (lambda: make_consumer(settings))
        self._readers = readers or (lambda: make_reader(settings))
        self._producers = producers or (lambda txn: make_producer(settings, txn))

    def consumer(self) -> GroupConsumer:
        return KafkaPythonConsumer(self._consumers())

    def reader(self) -> KafkaPythonConsumer:
        return KafkaPythonConsumer(self._readers())

    def producer(self, transactional_id: str | None) -> RecordProducer:
        return KafkaPythonProducer(self._producers(transactional_id))
