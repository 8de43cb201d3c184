"""The topics' partition counts, watched while running: partitions added to the
input, output, dead-letter or state topic change where outputs go, which keys move,
and which input partitions can be served.

Kept apart from the loop: it is housekeeping (at most once a second) and start-up
work, with rules of its own (docs/runbook.md, "Adding partitions").
"""

from __future__ import annotations

from daemon.config import Settings
from daemon.core.state import StateStore
from daemon.kafka.topics import Layout, known_layout, moved_sequences
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery import Delivery

log = get_logger("daemon.streaming.loop")


class TopicWatch:
    """The four topics' partition counts last seen, the input's count announced, and
    the input partitions held for want of a state partition."""

    def __init__(self, settings: Settings, store: StateStore, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.layout: Layout | None = None
        # The input topic's partition count as start-up found it (0: not known yet).
        self.input_partitions = 0
        self._held: set[int] = set()

    def watch(self, delivery: Delivery) -> None:
        """Partitions added to the topics while running, as the producer's metadata
        sees them (refreshed every 30 s: clients.METADATA_MAX_AGE_MS). Outputs go to
        their input's partition number only while the output and dead-letter topics
        have the input's count; a grown input topic is announced with the open
        sequences whose key it moves; a state topic smaller than the input is an
        error, and the input partitions it lacks wait (`stateless`)."""
        layout = known_layout(delivery.producer, self.settings)
        if layout is None or layout == self.layout:
            return
        self.layout = layout
        if delivery.same_partitions != layout.aligned:
            delivery.same_partitions = layout.aligned
            log.info("outputs_partitioning", by_input_partition=layout.aligned, layout=vars(layout))
        if layout.input > self.input_partitions:
            if self.input_partitions:
                self._announce_growth(self.input_partitions, layout.input)
            self.input_partitions = layout.input
        if layout.stateless:
            log.error(
                "state_partitions_missing",
                state_topic=self.settings.state_topic,
                layout=vars(layout),
                waiting=list(layout.stateless),
                action=f"add partitions to the state topic: at least {layout.input}",
            )

    def _announce_growth(self, before: int, after: int) -> None:
        """The input topic grew: a producer's default partitioner now puts some keys in
        another partition (hash modulo the count). An open sequence of such a key keeps
        its state here, in its old partition, where its inputs may still arrive until
        its producers refresh their metadata; its inputs in the new partition start
        over from a zero state. Counted (per partitioner: the daemon cannot know which
        one its producers use) and announced, not dropped (docs/runbook.md)."""
        open_keys = [(p, key) for p, key, state in self.store if state.n]
        moved = moved_sequences(open_keys, before, after)
        for partitioner, count in moved.items():
            self.metrics.moved_sequences.labels(partitioner=partitioner).inc(count)
        log.warning(
            "input_partitions_added",
            **{"from": before, "to": after},
            open_sequences=len(open_keys),
            moved_murmur2=moved["murmur2"],
            moved_crc32=moved["crc32"],
            message="open sequences whose key now hashes to another partition start over there",
        )

    def stateless(self, delivery: Delivery, partition: int) -> bool:
        """Whether an assigned input partition has no state partition of its number yet
        (the input topic grew before the state topic): its states could be neither
        restored nor written, so it is not restored and serves nothing until the state
        topic grows. Fresh metadata is asked for once when it starts to wait."""
        known = self.layout.state if self.layout is not None else self.input_partitions
        if partition < known:
            self._held.discard(partition)
            return False
        if partition not in self._held:
            self._held.add(partition)
            delivery.producer.refresh_metadata(0)
            log.info(
                "partition_waiting_for_state",
                partition=partition,
                state_topic=self.settings.state_topic,
                state_partitions=known,
            )
        return True
