"""What the two delivery pipelines share: the producer they send through, the
checkpoint's timing, the count of what became durable, and how a member knows the
group expelled it (the fence of every write that is not a transaction's).

Each pipeline says only what a checkpoint is in its mode: at_least_once.py
(pipelined sends, acknowledged by the next checkpoint, then an offset commit) and
transactional.py (a transaction per checkpoint).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.future import Future
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata

from daemon.core.records import Kind, StateRecord
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery.order import Record
from daemon.streaming.delivery.producer import Producer
from daemon.streaming.policy import Checkpoint


class Pipeline(abc.ABC):
    """A delivery mode over one producer (`out`)."""

    def __init__(self, out: Producer, metrics: Metrics) -> None:
        self.out = out
        self.settings = out.settings
        self.metrics = metrics

    @property
    def producer(self) -> KafkaProducer:
        """The producer in use now (its metadata tells the topics' partition counts)."""
        return self.out.kafka

    @property
    def same_partitions(self) -> bool:
        """Outputs go to their input's partition number (the topics' counts agree)."""
        return self.out.same_partitions

    @same_partitions.setter
    def same_partitions(self, value: bool) -> None:
        self.out.same_partitions = value

    def within(self, seconds: float) -> AbstractContextManager[None]:
        return self.out.within(seconds)

    def close(self, timeout: float) -> None:
        self.out.close(timeout)

    def commit(self, consumer: KafkaConsumer, cp: Checkpoint) -> bool:
        """Make the checkpoint durable. Returns False if the offsets could not be
        committed because the group moved on (at-least-once: harmless repeats)."""
        started = time.perf_counter()
        try:
            return self._commit(consumer, cp)
        finally:
            self.metrics.checkpoint.observe(time.perf_counter() - started)

    @abc.abstractmethod
    def _commit(self, consumer: KafkaConsumer, cp: Checkpoint) -> bool: ...

    # -- checkpoints that do not wait (at-least-once overrides them) -------------------
    def queue(self, consumer: KafkaConsumer, cp: Checkpoint) -> bool:
        """Send `cp`'s outputs and queue it without waiting; False: take it the
        synchronous way (`commit`), with everything pending (`take_pending`)."""
        return False

    def advance(self, consumer: KafkaConsumer) -> list[Checkpoint]:
        """Move the queued checkpoints on without waiting; those now committed, in order."""
        return []

    def take_pending(self) -> list[Checkpoint]:
        """The queued checkpoints not yet committed, in order, for a synchronous one."""
        return []

    def _account(self, sent: Iterable[tuple[Record, Future]]) -> None:
        """Count what became durable: state records by kind, predictions with their
        end-to-end latency."""
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


def expelled(group: ConsumerGroupMetadata) -> bool:
    """kafka-python reset the generation: the group expelled this member
    (max.poll.interval exceeded, session expired), its partitions are another's."""
    return bool(group.generation_id < 0)


def member(consumer: KafkaConsumer) -> bool:
    return not expelled(consumer.group_metadata())  # type: ignore[no-untyped-call]


def commit_async(consumer: KafkaConsumer, offsets: Mapping[TopicPartition, int]) -> Future:
    """Commit the offsets without waiting: the future is done once the group answered.

    kafka-python's own future may be its coordinator lookup's, not the commit's (when
    the coordinator is not known yet), so the answer is taken from the commit's
    callback instead, which kafka-python runs inside a later `poll`. (The Kafka client
    port's `GroupConsumer.commit_async` returns the commit's future itself.)
    """
    done = Future()

    def answered(_offsets: object, response: object) -> None:
        if done.is_done:
            return
        if isinstance(response, Exception):
            done.failure(response)
        else:
            done.success(None)

    try:
        consumer.commit_async(
            {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}, callback=answered
        )
    except KafkaError as exc:  # e.g. a fenced static member, raised at once
        done.failure(exc)
    return done
