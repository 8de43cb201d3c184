"""What the two delivery pipelines share: the producer they send through, the
checkpoint's timing and the count of what became durable.

Each pipeline says only what a checkpoint is in its mode: at_least_once.py
(pipelined sends, acknowledged by the next checkpoint, then an offset commit) and
transactional.py (a transaction per checkpoint).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager

from daemon.core.records import Kind, StateRecord
from daemon.kafka.port import Future, GroupConsumer, RecordProducer
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
    def producer(self) -> RecordProducer:
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

    def commit(self, consumer: GroupConsumer, cp: Checkpoint) -> bool:
        """Make the checkpoint durable. Returns False if the offsets could not be
        committed because the group moved on (at-least-once: harmless repeats)."""
        started = time.perf_counter()
        try:
            return self._commit(consumer, cp)
        finally:
            self.metrics.checkpoint.observe(time.perf_counter() - started)

    @abc.abstractmethod
    def _commit(self, consumer: GroupConsumer, cp: Checkpoint) -> bool: ...

    # -- checkpoints that do not wait (at-least-once overrides them) -------------------
    def queue(self, consumer: GroupConsumer, cp: Checkpoint) -> bool:
        """Send `cp`'s outputs and queue it without waiting; False: take it the
        synchronous way (`commit`), with everything pending (`take_pending`)."""
        return False

    def advance(self, consumer: GroupConsumer) -> list[Checkpoint]:
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
