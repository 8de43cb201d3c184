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
- sends are acknowledged at once, or held until `acknowledge()` (`hold_acks`), or
  failed by `fail_sends` (a function of topic and key returning the error);
- `faults` queues the errors the next calls raise (a poll, a commit, a transaction's
  commit or abort), one per call, as a broker away or a group rebalancing would.

Every call is recorded where a test asks what the daemon did (`calls`, `commits`).
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
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    UnknownTopicOrPartitionError,
)
from kafka.future import Future
from kafka.partitioner.default import murmur2
from kafka.producer.future import RecordMetadata
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
    commit_transaction: list[Exception] = field(default_factory=list)
    abort_transaction: list[Exception] = field(default_factory=list)
    offsets: list[Exception] = field(default_factory=list)  # a reader's beginning or end offsets

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
        # A send's error, or None to accept it (producer side, before acknowledgement).
        self.fail_sends: Callable[[str, bytes | None], KafkaError | None] | None = None
        # Held acknowledgements: (future, append) in send order, answered by `acknowledge`.
        self.hold_acks = False
        self._held: list[tuple[Future, Callable[[], RecordMetadata]]] = []
        # The error of every consumer commit while set (a member the group expelled).
        self.fail_commits: KafkaError | None = None
        self.faults = Faults()
        # How long each poll of a reader (restore, rebuild) takes: a slow partition read.
        self.read_delay_s = 0.0
        self.producers: list[MemoryProducer] = []

    # -- topics -------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1) -> None:
        self.topics.setdefault(name, [_Partition() for _ in range(partitions)])

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
    def acknowledge(self, n: int | None = None) -> int:
        """Answer the first `n` held sends (all by default); how many were answered."""
        take, self._held = (
            self._held[: len(self._held) if n is None else n],
            self._held[len(self._held) if n is None else n :],
        )
        for future, append in take:
            future.success(append())
        return len(take)

    @property
    def unacknowledged(self) -> int:
        return len(self._held)

    # -- clients ------------------------------------------------------------------
    def group(self, group_id: str) -> _Group:
        return self.groups.setdefault(group_id, _Group())

    def consumer(self, group_id: str = "g", max_poll_records: int = 500) -> MemoryConsumer:
        return MemoryConsumer(self, group_id, max_poll_records)

    def reader(self) -> MemoryConsumer:
        """A consumer without a group, read by assignment (restore and rebuild)."""
        return MemoryConsumer(self, None, 500)

    def producer(self, transactional_id: str | None = None) -> MemoryProducer:
        producer = MemoryProducer(self, transactional_id)
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
        elif self.kafka.read_delay_s:
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
        return self.kafka.group(self.group_id).committed.get(tp)

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        self.commit_timeouts.append(timeout_ms)
        self._commit(offsets)

    def commit_async(self, offsets: dict[TopicPartition, Any]) -> Future:
        """Answered at once: awaiting it does not yield to kafka-python's loop."""
        try:
            self._commit(offsets)
        except KafkaError as exc:
            return Future().failure(exc)
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

    def close(self, autocommit: bool = False, timeout_ms: int | None = None) -> None:
        """Leaving the group revokes its partitions (the listener sees it, as in kafka-python)."""
        if self.group_id is not None and self._assigned and self.listener is not None and not self._expelled:
            finish(self.listener.on_partitions_revoked(set(self._assigned)))
        self.leave()
        self._assigned = set()
        self.closed = True


class _Metadata(ClusterMetadata):
    """The producer's view of partition counts (kafka-python keeps it in ClusterMetadata)."""

    def __init__(self, kafka: MemoryKafka) -> None:
        super().__init__()
        self.kafka = kafka
        self.updates = 0

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self.kafka.partition_count(topic)
        return set(range(count)) if count else None

    def request_update(self) -> Future:
        self.updates += 1
        return Future().success(self)


class MemoryProducer:
    """kafka-python's KafkaProducer, as far as the daemon calls it."""

    def __init__(self, kafka: MemoryKafka, transactional_id: str | None) -> None:
        self.kafka = kafka
        self.transactional_id = transactional_id
        self._metadata = _Metadata(kafka)
        self.calls: list[str] = []
        self.sent: list[tuple[str, bytes | None]] = []  # every send: topic, value
        self.fenced = False
        self.closed = False
        self._transaction: list[Callable[[], RecordMetadata]] | None = None
        self._offsets: tuple[str, dict[TopicPartition, int]] | None = None

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> Future:
        if key is None and value is None:
            raise ValueError("Need at least one: key or value")  # as kafka-python 3.0.12
        if self.kafka.partition_count(topic) == 0:
            raise KafkaTimeoutError(f"topic {topic} not in metadata")
        if partition is None:
            partition = _by_key(key, self.kafka.partition_count(topic))
        elif partition >= self.kafka.partition_count(topic):
            raise ValueError("Unrecognized partition")  # as kafka-python 3.0.12
        self.sent.append((topic, value))
        future = Future()
        error = self.kafka.fail_sends(topic, key) if self.kafka.fail_sends is not None else None
        if error is not None:
            return future.failure(error)
        part = partition

        def append() -> RecordMetadata:
            rec = self.kafka._append(topic, part, key, value, list(headers or ()), timestamp_ms)
            return RecordMetadata(
                topic, part, TopicPartition(topic, part), rec.offset, rec.timestamp, None, 0, 0, 0
            )

        if self._transaction is not None:
            self._transaction.append(append)  # visible at commit
            return future.success(
                RecordMetadata(topic, part, TopicPartition(topic, part), -1, -1, None, 0, 0, 0)
            )
        if self.kafka.hold_acks:
            self.kafka._held.append((future, append))
            return future
        return future.success(append())

    def flush(self, timeout: float | None = None) -> None:
        self.calls.append("flush")
        if any(not f.is_done for f, _ in self.kafka._held):
            if timeout is not None:
                time.sleep(min(timeout, 0.01))
            raise KafkaTimeoutError("acknowledgements held")

    def close(self, timeout: float | None = None) -> None:
        self.calls.append("close")
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


def _metadata(topic: str, partition: int, offset: int, timestamp: int) -> RecordMetadata:
    return RecordMetadata(
        topic, partition, TopicPartition(topic, partition), offset, timestamp, None, 0, 0, 0
    )


def _offsets(offsets: dict[TopicPartition, Any]) -> dict[TopicPartition, int]:
    """Offsets as kafka-python takes them (OffsetAndMetadata or int), as ints."""
    return {tp: int((o.offset or 0) if isinstance(o, OffsetAndMetadata) else o) for tp, o in offsets.items()}


def _by_key(key: bytes | None, partitions: int) -> int:
    """kafka-python's default partitioner (murmur2 of the key); no key: partition 0."""
    if key is None:
        return 0
    return (murmur2(key) & 0x7FFFFFFF) % partitions
