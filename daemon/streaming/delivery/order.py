"""The one ordering rule of delivery, used by both pipelines: from a key's first
failed record on, every later record of that key is sent again.

Kafka keeps the order in which a partition's records were written. A record
resent after a failure must never land after a later record of its key (a
tombstone after the key's new state, a prediction after the next step's: a
compacted topic would keep the stale one). So the records after it go again
too, those already acknowledged included (a repeat, identical); the other keys'
records are not repeated.
"""

from __future__ import annotations

from collections.abc import Iterable

from daemon.core.records import Kind, OutputRecord, StateRecord
from daemon.kafka.port import Future

Record = OutputRecord | StateRecord
# Records handed to the producer, in send order, with their acknowledgements.
Sent = list[tuple[Record, Future]]
# What Kafka orders records by, here: the kind of topic and the key.
Destination = tuple[str, bytes | str | None]


def destination(item: Record) -> Destination:
    """Where `item`'s order matters: its topic's kind and its key."""
    if isinstance(item, StateRecord):
        return "state", item.wire_key
    kind = {Kind.DEAD_LETTER: "dlq", Kind.SHADOW: "shadow"}.get(item.kind, "out")
    return kind, item.key


class KeyOrder:
    """Judges sent records in send order, keeping those to send again (`resend`):
    every failed record and every later record of its key. Fed all at once
    (`in_key_order`) or as acknowledgements arrive (the at-least-once pipeline's
    records in flight between checkpoints)."""

    def __init__(self) -> None:
        self.broken: set[Destination] = set()  # keys with a failure in `resend`
        self.resend: Sent = []

    def judge(self, item: Record, future: Future) -> None:
        """`item`'s send is done (acknowledged or failed): keep it if it goes again."""
        where = destination(item)
        if not future.succeeded():
            self.broken.add(where)
        if where in self.broken:
            self.resend.append((item, future))

    def release(self, partition: int) -> None:
        """Forget the records of input partition `partition` (revoked: its next owner
        publishes them). A key stays broken only while its failure is still kept."""
        self.resend = [(i, f) for i, f in self.resend if i.partition != partition]
        self.broken = {destination(i) for i, _ in self.resend}

    def clear(self) -> Sent:
        """What to send again, in send order; the rule starts over."""
        resend, self.resend, self.broken = self.resend, [], set()
        return resend


def in_key_order(sent: Iterable[tuple[Record, Future]]) -> list[Record]:
    """What to send again after a partial failure of `sent`, keeping each key's order."""
    order = KeyOrder()
    for item, future in sent:
        order.judge(item, future)
    return [item for item, _ in order.resend]
