"""The rebalance listener: kafka-python's callbacks handed over to the run loop's thread,
and the checkpoint of a planned revocation made inside the callback.

kafka-python 3 calls listeners on its IO thread, from within `poll()` (or `close()`),
while the run loop's thread waits in that call: nothing else touches the state store
meanwhile. Assignments and losses are only collected here, for the run loop to apply
after `poll` returns.

A revocation (cooperative rebalance: another worker or pod joined, or this one is
leaving) is different: what is in hand must be checkpointed before the partitions
move, or their next owner repeats it. After the callback the same `poll()` goes on
to the follow-up rebalance, and from then on every commit of this member fails with
RebalanceInProgress, so the run loop cannot do it after `poll` returns (the issue's
"240 of 825 predictions repeated"). Kafka Streams and Quix commit in the revocation
callback for that reason; so do we: `before_revoke` (the run loop's) makes the
outputs and states durable and returns the offsets, which are committed here with
the consumer's own asynchronous commit, awaited on the IO thread (a blocking
`commit()` from that thread would deadlock: kafka-python refuses it). The commit is
sent within the generation that revoked the partitions, before the next JoinGroup.
The run loop counts those offsets as not yet committed all the same (when the
coordinator is being looked up, the awaited future is the lookup's, not the
commit's): the partitions it keeps commit them again at its next checkpoint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from daemon.ops.logs import get_logger

log = get_logger(__name__)

# Offsets to commit (next offset to read), or None when nothing is to be committed.
BeforeRevoke = Callable[[set[TopicPartition]], dict[TopicPartition, int] | None]


@dataclass
class RebalanceEvents(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Collects assignment changes for the run loop to apply after poll returns;
    checkpoints before a revocation when given `before_revoke` (see the module)."""

    consumer: KafkaConsumer | None = None
    before_revoke: BeforeRevoke | None = None
    assigned: set[TopicPartition] = field(default_factory=set)
    revoked: set[TopicPartition] = field(default_factory=set)
    lost: set[TopicPartition] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        with self.lock:
            self.assigned.update(assigned)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._checkpoint(set(revoked))
        with self.lock:
            self.revoked.update(revoked)

    async def on_partitions_lost(self, lost: Any) -> None:
        # Another member owns them already: nothing may be committed for them.
        with self.lock:
            self.lost.update(lost)

    async def _checkpoint(self, revoked: set[TopicPartition]) -> None:
        if self.before_revoke is None or self.consumer is None or not revoked:
            return
        offsets = self.before_revoke(revoked)  # never raises: the run loop keeps its errors
        if not offsets:
            return
        try:
            await self.consumer.commit_async({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        except KafkaError as exc:  # the next owner repeats from the last commit: harmless
            log.warning("revocation_commit_failed", error=str(exc), cause=type(exc).__name__)

    def take(self) -> tuple[set[TopicPartition], set[TopicPartition], set[TopicPartition]]:
        with self.lock:
            out = (self.assigned, self.revoked, self.lost)
            self.assigned, self.revoked, self.lost = set(), set(), set()
        return out
