"""The run loop: the only place where Kafka I/O, state and the engine meet.

poll -> process (decode, state, engine) -> publish and wait for every
acknowledgement -> commit the batch's offsets -> poll again. Nothing is
committed before its outputs are durable in Kafka, so a crash anywhere
repeats work and never skips it (at-least-once).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from daemon.config import Settings
from daemon.http import Health
from daemon.kafka_io import (
    RebalanceEvents,
    ensure_topics,
    make_consumer,
    make_producer,
    wait_for_cluster,
)
from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.processor import OutputRecord, Processor

log = get_logger(__name__)

# Short enough that SIGTERM and rebalances are noticed promptly, long enough
# that an idle daemon does not spin.
POLL_TIMEOUT_MS = 200
# Consumer lag is refreshed at most this often: it needs no network round trip
# (high watermarks come with fetch responses) but there is no need to do it per batch.
LAG_INTERVAL_S = 1.0
# A batch of outputs must be acknowledged within this; otherwise it is retried.
FLUSH_TIMEOUT_S = 30.0
MAX_RETRY_DELAY_S = 30.0


class DeliveryFailed(Exception):
    """Outputs could not be published before the daemon was asked to stop."""


class RunLoop:
    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        metrics: Metrics,
        health: Health,
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self._next_offset: dict[int, int] = {}
        self._lag_checked = 0.0

    def run(self) -> None:
        """Serve until `stop` is set; returns after a clean flush, commit and close."""
        admin = wait_for_cluster(self.settings, self.stop)
        if admin is None:
            return
        try:
            partitions = ensure_topics(admin, self.settings)
        finally:
            admin.close()
        log.info("kafka_ready", input_topic=self.settings.input_topic, partitions=partitions)
        consumer = make_consumer(self.settings)
        producer = make_producer(self.settings)
        listener = RebalanceEvents()
        consumer.subscribe([self.settings.input_topic], listener=listener)
        self.health.reason = "waiting for the group to assign partitions"
        try:
            while not self.stop.is_set():
                polled = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
                self.health.beat()
                self.metrics.last_poll.set_to_current_time()
                self._apply_rebalance(consumer, listener)
                if polled:
                    self._handle(consumer, producer, polled)
                self._update_lag(consumer)
            log.info("stopping", reason="signal")
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=FLUSH_TIMEOUT_S)
            log.info("kafka_closed")

    def _handle(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        polled: dict[TopicPartition, list[Any]],
    ) -> None:
        batch = [rec for tp in sorted(polled, key=lambda t: t.partition) for rec in polled[tp]]
        outputs = self.processor.process(batch)
        self._deliver(producer, outputs)
        next_offsets = {tp: recs[-1].offset + 1 for tp, recs in polled.items() if recs}
        self._next_offset.update({tp.partition: o for tp, o in next_offsets.items()})
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in next_offsets.items()}
        try:
            consumer.commit(offsets)
            self.metrics.commits.inc()
        except CommitFailedError as exc:
            # The group moved on (a rebalance): the new owner starts from the
            # previous commit and repeats these outputs with identical values.
            log.warning("commit_failed", error=str(exc), partitions=sorted(
                tp.partition for tp in offsets))

    def _deliver(self, producer: KafkaProducer, outputs: Sequence[OutputRecord]) -> None:
        """Publish outputs and wait for all acknowledgements, retrying with backoff."""
        pending = list(outputs)
        delay = 0.5
        while pending:
            sent = [(out, producer.send(
                self.settings.dead_letter_topic if out.dead_letter else self.settings.output_topic,
                key=out.key, value=out.value, headers=out.headers or None,
            )) for out in pending]
            try:
                producer.flush(timeout=FLUSH_TIMEOUT_S)
            except KafkaError as exc:
                log.error("flush_timeout", error=str(exc))
            now = time.time()
            pending = []
            delivered = 0
            for out, future in sent:
                if future.succeeded():
                    if not out.dead_letter:
                        delivered += 1
                        self.metrics.end_to_end.observe(now - out.source_timestamp_ms / 1000.0)
                else:
                    pending.append(out)
            self.metrics.predictions.inc(delivered)
            if not pending:
                return
            first_error = next((f.exception for _, f in sent if f.failed()), "not acknowledged")
            self.metrics.produce_errors.inc()
            log.error("produce_failed", undelivered=len(pending), error=str(first_error),
                      retry_in_s=delay)
            if self.stop.wait(delay):
                raise DeliveryFailed(f"{len(pending)} outputs undelivered at shutdown")
            delay = min(delay * 2, MAX_RETRY_DELAY_S)

    def _apply_rebalance(self, consumer: KafkaConsumer, listener: RebalanceEvents) -> None:
        assigned, revoked, lost = listener.take()
        if not (assigned or revoked or lost):
            return
        for kind, tps in (("revoked", revoked), ("lost", lost)):
            for tp in tps:
                # Everything polled so far is committed: dropping the state is all
                # that is left to do. The next owner rebuilds its own.
                dropped = self.processor.store.drop_partition(tp.partition)
                self._next_offset.pop(tp.partition, None)
                with contextlib.suppress(KeyError):  # no lag reported for it yet
                    self.metrics.lag.remove(str(tp.partition))
                log.info("partition_released", kind=kind, partition=tp.partition,
                         states_dropped=dropped)
            if tps:
                self.metrics.rebalances.labels(kind=kind).inc()
        if assigned:
            self.metrics.rebalances.labels(kind="assigned").inc()
            log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))
        now_assigned = consumer.assignment()
        self.metrics.assigned.set(len(now_assigned))
        self.health.assigned = bool(now_assigned)
        self.metrics.active_sequences.set(len(self.processor.store))

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        now = time.monotonic()
        if now - self._lag_checked < LAG_INTERVAL_S:
            return
        self._lag_checked = now
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            position = self._next_offset.get(tp.partition)
            if high is None:
                continue
            if position is None:
                try:
                    position = consumer.position(tp, timeout_ms=100)
                except KafkaError:
                    continue
            if position is not None:
                self.metrics.lag.labels(partition=str(tp.partition)).set(max(0, high - position))
