"""The rebalance listener: kafka-python's callbacks handed over to the run loop's thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener


@dataclass
class RebalanceEvents(ConsumerRebalanceListener):  # type: ignore[misc]
    """Collects assignment changes for the run loop to apply after poll returns.

    kafka-python 3 calls listeners on its IO thread; handing the changes over
    keeps every touch of the state store on the run loop's thread.
    """

    assigned: set[TopicPartition] = field(default_factory=set)
    revoked: set[TopicPartition] = field(default_factory=set)
    lost: set[TopicPartition] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_partitions_assigned(self, assigned: Any) -> None:
        with self.lock:
            self.assigned.update(assigned)

    def on_partitions_revoked(self, revoked: Any) -> None:
        with self.lock:
            self.revoked.update(revoked)

    def on_partitions_lost(self, lost: Any) -> None:
        with self.lock:
            self.lost.update(lost)

    def take(self) -> tuple[set[TopicPartition], set[TopicPartition], set[TopicPartition]]:
        with self.lock:
            out = (self.assigned, self.revoked, self.lost)
            self.assigned, self.revoked, self.lost = set(), set(), set()
        return out
