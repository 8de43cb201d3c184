"""Housekeeping, at most once a second: the topics' partition counts, idle
evictions, the memory gauges and each partition's lag.

Kept apart from the loop because none of it is on an event's path: it only has to
happen often enough, and its waits are bounded so it never holds the loop long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.kafka.errors import KafkaError
from daemon.kafka.port import GroupConsumer, TopicPartition
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.follow import Followers
from daemon.streaming.layout import TopicWatch
from daemon.streaming.lifecycle import Partitions
from daemon.streaming.policy import CheckpointPolicy
from daemon.streaming.startup import Clients

log = get_logger("daemon.streaming.loop")

# Lag and idle eviction are housekeeping: at most once a second.
HOUSEKEEPING_INTERVAL_S = 1.0
# One wait for the ends of paused partitions (their lag), at most once a housekeeping.
LAG_END_OFFSETS_TIMEOUT_MS = 200


@dataclass
class Housekeeping:
    settings: Settings
    processor: Processor
    metrics: Metrics
    partitions: Partitions
    policy: CheckpointPolicy
    topics: TopicWatch
    followers: Followers | None = None
    _last: float = field(default=0.0)

    def run(self, clients: Clients) -> None:
        """Do the housekeeping if its interval has passed since the last."""
        now = time.monotonic()
        if now - self._last < HOUSEKEEPING_INTERVAL_S:
            return
        self._last = now
        self.topics.watch(clients.delivery)
        store = self.processor.store
        if self.settings.sequence_idle_timeout_s:
            self.policy.notify(self.processor.evict_idle(self.settings.sequence_idle_timeout_s))
            if self.followers:
                self.policy.notify(self.followers.evict_idle(self.settings.sequence_idle_timeout_s))
        self.metrics.state_bytes.set(store.state_bytes())
        self.metrics.ended_sequences.set(store.ended())
        self._report_lag(clients.consumer)

    def _report_lag(self, consumer: GroupConsumer) -> None:
        """Each assigned partition's lag: its end minus the next offset to process.

        The end is the high watermark of the partition's last fetch, except for a
        paused partition (backpressure): it is not fetched, so that figure would
        freeze while producers go on writing. Those partitions' ends are asked of the
        broker instead, once, with a bound (LAG_END_OFFSETS_TIMEOUT_MS); unanswered,
        their gauges keep their last value until the next housekeeping.
        """
        assigned = consumer.assignment()
        paused = consumer.paused() & assigned
        ends: dict[TopicPartition, int] = {}
        if paused:
            try:
                ends = consumer.end_offsets(sorted(paused), timeout_ms=LAG_END_OFFSETS_TIMEOUT_MS)
            except KafkaError as exc:
                log.debug("lag_unknown", partitions=sorted(tp.partition for tp in paused), error=str(exc))
        for tp in assigned:
            high = ends.get(tp) if tp in paused else consumer.highwater(tp)
            position = self.partitions.position(tp.partition)
            if high is None:
                continue
            if position is None:
                try:
                    position = consumer.position(tp, timeout_ms=100)
                except KafkaError:
                    continue
            if position is not None:
                self.metrics.lag.labels(partition=str(tp.partition)).set(max(0, high - position))
