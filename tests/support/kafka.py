"""One in-memory Kafka for the unit tests: topics and partitions, a consumer group
with assignment, revocation and loss, producers with acknowledgements, failures and
transactions.

It speaks the part of kafka-python's public client API the daemon uses (the same
calls, the same futures and records), so the run loop, delivery, restore and
rebuild run on it unchanged; `tests/support/backends.py` runs one scenario on it
and on the real broker. It is a model of Kafka's semantics, kept small:

- a partition is a list of records; offsets are list indices (records deleted by
  retention leave `beginning` above 0);
- transactional records become visible at commit and vanish at abort (read
  committed: the only isolation the daemon uses), with the offsets sent to the
  transaction committed with them;
- a group assigns its subscription's partitions round robin over its members, in
  join order; a change (a member joins or leaves, a topic grows) is a cooperative
  rebalance each member applies at its next poll: the revoked partitions first
  (its listener's `on_partitions_revoked`, awaited as kafka-python's IO thread does),
  then the assigned ones; `expel` makes a member lose everything (`on_partitions_lost`);
- a send is checked as kafka-python 3.0.12's `send` checks it before queueing it
  (key or value, header and value types, `max_request_size`, a partition its
  metadata lists) and `refuse_sends` may make it raise anything else the client
  raises; a producer sees partitions added since it last refreshed its metadata only
  at its next refresh when `stale_metadata` is set;
- sends are acknowledged at once, or held until `acknowledge()` (`hold_acks`) or
  until their producer flushes (`ack_on_flush`), and the broker's answer is a
  failure where `fail_sends` (a function of topic, key and value) says so;
- `faults` queues the errors the next calls raise (building a client, a poll, a
  commit, a transaction's commit or abort), one per call, as a broker away or a
  group rebalancing would.

Every call is recorded where a test asks what the daemon did (`calls`, `commits`),
and `journal` tells the order of sends, flushes, acknowledgements and commits.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.cluster import ClusterMetadata
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    UnknownTopicOrPartitionError,
)
from kafka.future import Future
from kafka.partitioner.default import murmur2
from kafka.producer.future import RecordMetadata
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

Headers = Sequence[tuple[str, bytes | None]]


def finish(coro: Coroutine[Any, Any, None]) -> None:
    """Run a rebalance-listener callback whose awaits are all answered already (as
    every future of this Kafka is): kafka-python awaits them on its IO thread."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise AssertionError("the callback waited on kafka-python's loop")


@dataclass
class _Partition:
    records: list[ConsumerRecord | None] = field(default_factory=list)
    beginning: int = 0

    @property
    def end(self) -> int:
        return len(self.records)


@dataclass
class Faults:
    """Errors the next calls raise, one per call, in order: each list is emptied as its
    errors are raised (a broker away, a group rebalancing, a fenced producer)."""

    poll: list[Exception] = field(default_factory=list)
    commit: list[Exception] = field(default_factory=list)
    connect: list[Exception] = field(default_factory=list)  # building a producer (bootstrap)
    read: list[Exception] = field(default_factory=list)  # a reader's poll (restore, rebuild)
    commit_transaction: list[Exception] = field(default_factory=list)
    abort_transaction: list[Exception] = field(default_factory=list)
    offsets: list[Exception] = field(default_factory=list)  # a reader's beginning or end offsets
    committed: list[Exception] = field(default_factory=list)  # a group's committed offset

    @staticmethod
    def raise_next(queue: list[Exception]) -> None:
        if queue:
            raise queue.pop(0)


@dataclass
class _Group:
    members: list[MemoryConsumer] = field(default_factory=list)
    generation: int = 0
    committed: dict[TopicPartition, int] = field(default_factory=dict)

    def target(self, member: MemoryConsumer, kafka: MemoryKafka) -> set[TopicPartition]:
        """The member's share: the subscription's partitions, round robin in join order."""
        if member not in self.members:
            return set()
        topics = sorted({t for m in self.members for t in m.subscription})
        tps = [TopicPartition(t, p) for t in topics for p in range(kafka.partition_count(t))]
        i = self.members.index(member)
        return {tp for n, tp in enumerate(tps) if n % len(self.members) == i}


class MemoryKafka:
    """The cluster: topics, groups, and the knobs of its faults."""

    def __init__(self) -> None:
        self.topics: dict[str, list[_Partition]] = {}
        self.groups: dict[str, _Group] = {}
        self.clock_ms = itertools.count(1_700_000_000_000)
        # The broker's answer to a send of (topic, key, value): an error, or None to
        # take the record. Given when the send is acknowledged (at once, or when held).
        self.fail_sends: Callable[[str, bytes | None, bytes | None], KafkaError | None] | None = None
        # An error the client's `send` raises for (topic, key, value) before queueing it
        # (one of its own checks, or a client bug), or None. Called at every send.
        self.refuse_sends: Callable[[str, bytes | None, bytes | None], Exception | None] | None = None
        # Held acknowledgements, in send order, answered by `acknowledge`...
        self.hold_acks = False
        # ...or by their producer's flush (the broker answers while the client waits).
        self.ack_on_flush = False
        self._held: list[_Held] = []
        # Producers see partition counts as of their last metadata refresh, not live.
        self.stale_metadata = False
        # Sends, flushes, acknowledgements and consumer commits, in order, e.g.
        # "send out b'1'", "flush", "ack out b'1'", "commit".
        self.journal: list[str] = []
        # The error of every consumer commit while set (a member the group expelled).
        self.fail_commits: KafkaError | None = None
        self.faults = Faults()
        # How long each poll of a reader (restore, rebuild) takes: a slow partition read.
        self.read_delay_s = 0.0
        self.producers: list[MemoryProducer] = []

    # -- topics -------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1) -> None:
        self.topics.setdefault(name, [_Partition() for _ in range(partitions)])

    def create_topics(self, *names: str, partitions: int = 1) -> None:
        for name in names:
            self.create_topic(name, partitions)

    def add_partitions(self, name: str, total: int) -> None:
        parts = self.topics[name]
        parts.extend(_Partition() for _ in range(total - len(parts)))
        for group in self.groups.values():
            if any(name in m.subscription for m in group.members):
                group.generation += 1

    def partition_count(self, topic: str) -> int:
        return len(self.topics.get(topic, ()))

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int = 0,
        headers: Headers = (),
        timestamp_ms: int | None = None,
    ) -> int:
        """Append one record as an upstream producer would; its offset."""
        self.create_topic(topic)
        return self._append(topic, partition, key, value, list(headers), timestamp_ms).offset

    def delete_before(self, topic: str, partition: int, offset: int) -> None:
        """Retention deleted the partition's records before `offset`."""
        part = self.topics[topic][partition]
        for i in range(part.beginning, min(offset, part.end)):
            part.records[i] = None
        part.beginning = max(part.beginning, offset)

    def records(self, topic: str, partition: int | None = None) -> list[ConsumerRecord]:
        """The topic's visible records, partition by partition."""
        parts = self.topics.get(topic, [])
        chosen = range(len(parts)) if partition is None else [partition]
        return [r for p in chosen for r in parts[p].records if r is not None]

    def values(self, topic: str, partition: int | None = None) -> list[bytes | None]:
        return [r.value for r in self.records(topic, partition)]

    def _append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
        timestamp_ms: int | None = None,
    ) -> ConsumerRecord:
        part = self.topics[topic][partition]
        ts = timestamp_ms if timestamp_ms is not None else next(self.clock_ms)
        record = ConsumerRecord(
            topic, partition, 0, part.end, ts, 0, key, value, headers, None,  # type: ignore[arg-type]
            len(key or b""), len(value or b""), -1,
        )  # fmt: skip
        part.records.append(record)
        return record

    # -- acknowledgements ---------------------------------------------------------
    def acknowledge(self, n: int | None = None, producer: MemoryProducer | None = None) -> int:
        """Answer the first `n` held sends (all by default; of `producer` only, if
        given); how many were answered."""
        mine = [h for h in self._held if producer is None or h.producer is producer]
        take = mine[: len(mine) if n is None else n]
        self._held = [h for h in self._held if h not in take]
        for held in take:
            held.answer()
        return len(take)

    @property
    def unacknowledged(self) -> int:
        return len(self._held)

    # -- clients ------------------------------------------------------------------
    def group(self, group_id: str) -> _Group:
        return self.groups.setdefault(group_id, _Group())

    def consumer(self, group_id: str = "g", max_poll_records: int = 500) -> MemoryConsumer:
        return MemoryConsumer(self, group_id, max_poll_records)

    def member(self, *topics: str, group_id: str = "g") -> MemoryConsumer:
        """A consumer that joined the group on `topics` and took its share (one poll:
        empty topics, or it reads their first records)."""
        consumer = self.consumer(group_id)
        consumer.subscribe(topics)
        consumer.poll()
        return consumer

    def reader(self) -> MemoryConsumer:
        """A consumer without a group, read by assignment (restore and rebuild)."""
        return MemoryConsumer(self, None, 500)

    def producer(
        self, transactional_id: str | None = None, max_request_size: int = 1048576
    ) -> MemoryProducer:
        """A producer (`max_request_size`: kafka-python's default); raises the next
        `faults.connect` error first, as a cluster that does not answer would."""
        self.faults.raise_next(self.faults.connect)
        producer = MemoryProducer(self, transactional_id, max_request_size)
        for other in self.producers:
            if transactional_id is not None and other.transactional_id == transactional_id:
                other.fenced = True  # init_transactions of the same id fences the older one
        self.producers.append(producer)
        return producer


class MemoryConsumer:
    """kafka-python's KafkaConsumer, as far as the daemon calls it."""

    def __init__(self, kafka: MemoryKafka, group_id: str | None, max_poll_records: int) -> None:
        self.kafka = kafka
        self.group_id = group_id
        self.max_poll_records = max_poll_records
        self.subscription: set[str] = set()
        self.listener: Any = None
        self._assigned: set[TopicPartition] = set()
        self._paused: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._highwater: dict[TopicPartition, int] = {}
        self._generation = -1
        self._expelled = False
        self.closed = False
        self.polls = 0
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_timeouts: list[int | None] = []
        self.end_timeouts: list[int | None] = []  # each end_offsets call's bound

    # -- the group ----------------------------------------------------------------
    def subscribe(self, topics: Iterable[str], listener: Any = None) -> None:
        assert self.group_id is not None, "a reader is assigned, not subscribed"
        self.subscription = set(topics)
        self.listener = listener
        group = self.kafka.group(self.group_id)
        group.members.append(self)
        group.generation += 1

    def leave(self) -> None:
        """Leave the group (its partitions go to the others at their next poll)."""
        if self.group_id is None:
            return
        group = self.kafka.group(self.group_id)
        if self in group.members:
            group.members.remove(self)
            group.generation += 1

    def expel(self) -> None:
        """The group expels this member (max.poll.interval exceeded): it loses its
        partitions at its next poll, and its commits fail until then."""
        self.leave()
        self._expelled = True

    def _rebalance(self) -> None:
        if self.group_id is None:
            return
        group = self.kafka.group(self.group_id)
        if self._expelled:
            lost, self._assigned = set(self._assigned), set()
            self._expelled = False
            self._generation = -1
            if lost and self.listener is not None:
                finish(self.listener.on_partitions_lost(lost))
            return
        if self._generation == group.generation or self not in group.members:
            return
        target = group.target(self, self.kafka)
        revoked, added = self._assigned - target, target - self._assigned
        if revoked:
            if self.listener is not None:
                finish(self.listener.on_partitions_revoked(revoked))
            self._assigned -= revoked
            self._paused -= revoked
        self._generation = group.generation
        if added:
            self._assigned |= added
            for tp in added:
                committed = group.committed.get(tp)
                self._positions[tp] = committed if committed is not None else self._beginning(tp)
            if self.listener is not None:
                finish(self.listener.on_partitions_assigned(added))

    def group_metadata(self) -> ConsumerGroupMetadata:
        generation = -1 if self._expelled else self._generation
        return ConsumerGroupMetadata(self.group_id, generation, f"member-{id(self)}", None)

    # -- assignment and positions --------------------------------------------------
    def assign(self, tps: Iterable[TopicPartition]) -> None:
        tps = set(tps)
        self._positions = {tp: self._positions.get(tp, self._beginning(tp)) for tp in tps}
        self._assigned = tps

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused |= set(tps) & self._assigned

    def resume(self, *tps: TopicPartition) -> None:
        self._paused -= set(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._positions[tp] = max(offset, self._beginning(tp))  # out of range: earliest

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps or tuple(self._assigned):
            self._positions[tp] = self._beginning(tp)

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return self._positions[tp]

    def highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end as its last fetch saw it (none for a paused partition)."""
        return self._highwater.get(tp)

    def beginning_offsets(
        self, tps: Iterable[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        self.kafka.faults.raise_next(self.kafka.faults.offsets)
        return {tp: self._beginning(tp) for tp in tps}

    def end_offsets(
        self, tps: Iterable[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        self.end_timeouts.append(timeout_ms)
        if self.group_id is None:
            self.kafka.faults.raise_next(self.kafka.faults.offsets)
        return {tp: self._part(tp).end for tp in tps}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.kafka.partition_count(topic)))

    def _part(self, tp: TopicPartition) -> _Partition:
        try:
            return self.kafka.topics[tp.topic][tp.partition]
        except (KeyError, IndexError):
            raise UnknownTopicOrPartitionError(str(tp)) from None

    def _beginning(self, tp: TopicPartition) -> int:
        return self._part(tp).beginning

    # -- reading ------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        self.polls += 1
        if self.group_id is not None:
            self.kafka.faults.raise_next(self.kafka.faults.poll)
        else:
            self.kafka.faults.raise_next(self.kafka.faults.read)
            if self.kafka.read_delay_s:
                time.sleep(self.kafka.read_delay_s)
        self._rebalance()
        budget = max_records or self.max_poll_records
        out: dict[TopicPartition, list[Any]] = {}
        for tp in sorted(self._assigned - self._paused):
            part, at = self._part(tp), self._positions[tp]
            self._highwater[tp] = part.end
            chunk: list[ConsumerRecord] = []
            while at < part.end and len(chunk) < budget:
                record = part.records[at]
                if record is not None:
                    chunk.append(record)
                at += 1
            self._positions[tp] = at
            budget -= len(chunk)
            if chunk:
                out[tp] = chunk
        return out

    # -- offsets ------------------------------------------------------------------
    def committed(self, tp: TopicPartition, timeout_ms: int | None = None) -> int | None:
        assert self.group_id is not None
        Faults.raise_next(self.kafka.faults.committed)
        return self.kafka.group(self.group_id).committed.get(tp)

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        self.commit_timeouts.append(timeout_ms)
        self._commit(offsets)

    def commit_async(
        self, offsets: dict[TopicPartition, Any], callback: Callable[[Any, Any], None] | None = None
    ) -> Future:
        """Answered at once: awaiting it does not yield to kafka-python's loop; the
        `callback` is called with the offsets and the error or None, as kafka-python's."""
        try:
            self._commit(offsets)
        except KafkaError as exc:
            if callback is not None:
                callback(offsets, exc)
            return Future().failure(exc)
        if callback is not None:
            callback(offsets, None)
        return Future().success(None)

    def _commit(self, offsets: dict[TopicPartition, Any]) -> None:
        if self.kafka.fail_commits is not None:
            raise self.kafka.fail_commits
        self.kafka.faults.raise_next(self.kafka.faults.commit)
        if self._expelled or not set(offsets) <= self._assigned:
            raise CommitFailedError("the group rebalanced: this member no longer owns the partitions")
        plain = _offsets(offsets)
        assert self.group_id is not None
        self.kafka.group(self.group_id).committed.update(plain)
        self.commits.append(plain)
        self.kafka.journal.append("commit")

    def close(self, autocommit: bool = False, timeout_ms: int | None = None) -> None:
        """Leaving the group revokes its partitions (the listener sees it, as in kafka-python)."""
        if self.group_id is not None and self._assigned and self.listener is not None and not self._expelled:
            finish(self.listener.on_partitions_revoked(set(self._assigned)))
        self.leave()
        self._assigned = set()
        self.closed = True


class _Metadata(ClusterMetadata):
    """The producer's view of partition counts (kafka-python keeps it in ClusterMetadata):
    live, or with `stale_metadata` the counts of its last refresh (`request_update`)."""

    def __init__(self, kafka: MemoryKafka) -> None:
        super().__init__()
        self.kafka = kafka
        self.updates = 0
        self._seen = self._counts()

    def _counts(self) -> dict[str, int]:
        return {topic: len(parts) for topic, parts in self.kafka.topics.items()}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = (self._seen if self.kafka.stale_metadata else self._counts()).get(topic, 0)
        return set(range(count)) if count else None

    def request_update(self) -> Future:
        self.updates += 1
        self._seen = self._counts()
        return Future().success(self)


class _Sender:
    """kafka-python's sender thread, as far as the daemon reaches into it: the topics
    it is asked to keep metadata for (`tracked`); it has no thread to force-close."""

    def __init__(self) -> None:
        self.tracked: list[str] = []

    def add_topic(self, topic: str) -> None:
        self.tracked.append(topic)

    def is_alive(self) -> bool:
        return False


@dataclass(eq=False)
class _Held:
    """A send waiting for the broker's answer (`hold_acks`, `ack_on_flush`)."""

    producer: MemoryProducer
    future: Future
    append: Callable[[], RecordMetadata]
    error: KafkaError | None
    topic: str
    value: bytes | None

    def answer(self) -> None:
        if self.error is not None:
            self.future.failure(self.error)
            return
        self.future.success(self.append())
        self.producer.kafka.journal.append(f"ack {self.topic} {self.value!r}")

    def drop(self) -> None:
        """The producer was closed without waiting: the record fails (force close)."""
        self.future.failure(KafkaConnectionError("producer closed before the record was acknowledged"))


class MemoryProducer:
    """kafka-python's KafkaProducer, as far as the daemon calls it."""

    def __init__(self, kafka: MemoryKafka, transactional_id: str | None, max_request_size: int) -> None:
        self.kafka = kafka
        self.transactional_id = transactional_id
        self.max_request_size = max_request_size
        self._metadata = _Metadata(kafka)
        self._sender = _Sender()
        self.calls: list[str] = []
        self.sent: list[tuple[str, bytes | None]] = []  # every send queued: topic, value
        self.fenced = False
        self.closed = False
        self._transaction: list[Callable[[], RecordMetadata]] | None = None
        self._offsets: tuple[str, dict[TopicPartition, int]] | None = None

    @property
    def tracked(self) -> list[str]:
        """The topics it was asked to keep metadata for (kafka-python's sender.add_topic)."""
        return self._sender.tracked

    @property
    def metadata_updates(self) -> int:
        """How many metadata refreshes it was asked for."""
        return self._metadata.updates

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Future:
        kafka = self.kafka
        refusal = kafka.refuse_sends(topic, key, value) if kafka.refuse_sends is not None else None
        if refusal is not None:
            raise refusal
        headers = _checked(key, value, headers)
        known = self._metadata.partitions_for_topic(topic)
        if known is None:
            raise KafkaTimeoutError(f"topic {topic} not in metadata")
        if partition is None:
            partition = _by_key(key, len(known))
        elif partition not in known:
            raise ValueError(f"Unrecognized partition {partition} for topic {topic}")  # kafka-python 3.0.12
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)  # type: ignore[no-untyped-call]
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        self.sent.append((topic, value))
        kafka.journal.append(f"send {topic} {value!r}")
        future = Future()
        error = kafka.fail_sends(topic, key, value) if kafka.fail_sends is not None else None
        part = partition

        def append() -> RecordMetadata:
            rec = kafka._append(topic, part, key, value, list(headers), timestamp_ms)
            return RecordMetadata(
                topic, part, TopicPartition(topic, part), rec.offset, rec.timestamp, None, 0, 0, 0
            )

        if self._transaction is not None:
            if error is not None:
                return future.failure(error)
            self._transaction.append(append)  # visible at commit
            return future.success(
                RecordMetadata(topic, part, TopicPartition(topic, part), -1, -1, None, 0, 0, 0)
            )
        held = _Held(self, future, append, error, topic, value)
        if kafka.hold_acks or kafka.ack_on_flush:
            kafka._held.append(held)
        else:
            held.answer()
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.calls.append("flush")
        self.kafka.journal.append("flush")
        if self.kafka.ack_on_flush:
            self.kafka.acknowledge(producer=self)
        if any(h.producer is self for h in self.kafka._held):
            if timeout is not None:
                time.sleep(min(timeout, 0.01))
            raise KafkaTimeoutError("acknowledgements held")

    def close(self, timeout: float | None = None) -> None:
        """Its sends still held are answered (`ack_on_flush`: close flushes first) or
        fail, as kafka-python's force close fails them."""
        self.calls.append("close")
        if self.kafka.ack_on_flush:
            self.kafka.acknowledge(producer=self)
        for held in [h for h in self.kafka._held if h.producer is self]:
            self.kafka._held.remove(held)
            held.drop()
        self.closed = True

    # -- transactions -------------------------------------------------------------
    def init_transactions(self) -> None:
        self.calls.append("init_transactions")

    def begin_transaction(self) -> None:
        self.calls.append("begin_transaction")
        self._check_fence()
        self._transaction, self._offsets = [], None

    def send_offsets_to_transaction(self, offsets: dict[TopicPartition, Any], group: Any) -> None:
        self.calls.append("send_offsets_to_transaction")
        self._check_fence()
        group_id = str(group.group_id if isinstance(group, ConsumerGroupMetadata) else group)
        self._offsets = (group_id, _offsets(offsets))
        if isinstance(group, ConsumerGroupMetadata) and group.generation_id < 0:
            raise CommitFailedError("the member was expelled from the group")

    def commit_transaction(self) -> None:
        self.calls.append("commit_transaction")
        self._check_fence()
        self.kafka.faults.raise_next(self.kafka.faults.commit_transaction)
        for append in self._transaction or []:
            append()
        if self._offsets is not None:
            group_id, offsets = self._offsets
            self.kafka.group(group_id).committed.update(offsets)
        self._transaction, self._offsets = None, None

    def abort_transaction(self) -> None:
        self.calls.append("abort_transaction")
        self._transaction, self._offsets = None, None
        self.kafka.faults.raise_next(self.kafka.faults.abort_transaction)

    def _check_fence(self) -> None:
        if self.fenced:
            raise ProducerFencedError("another producer with this transactional id")


def _checked(key: bytes | None, value: bytes | None, headers: Headers | None) -> list[tuple[str, bytes]]:
    """The headers, after kafka-python 3.0.12's checks of a send, in its order."""
    if key is None and value is None:
        raise ValueError("Need at least one: key or value")
    headers = [] if headers is None else headers
    if not isinstance(headers, list):
        raise TypeError("headers must be list-type")
    if not all(
        isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], bytes)
        for h in headers
    ):
        raise TypeError("All headers items must be (str, bytes) tuples")
    for part in (key, value):
        if part is not None and not isinstance(part, bytes):
            raise TypeError(f"Unsupported type for serialized key or value: {type(part)}")
    return headers


def _offsets(offsets: dict[TopicPartition, Any]) -> dict[TopicPartition, int]:
    """Offsets as kafka-python takes them (OffsetAndMetadata or int), as ints."""
    return {tp: int((o.offset or 0) if isinstance(o, OffsetAndMetadata) else o) for tp, o in offsets.items()}


def _by_key(key: bytes | None, partitions: int) -> int:
    """kafka-python's default partitioner (murmur2 of the key); no key: partition 0."""
    if key is None:
        return 0
    return (murmur2(key) & 0x7FFFFFFF) % partitions
