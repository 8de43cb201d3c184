"""The at-least-once outputs in flight: sent between checkpoints, tracked in send order
until the producer's IO thread answers them, judged by the key-order rule (order.py).

Each output gets a number in send order, so a checkpoint can say which outputs it
covers (those numbered below its mark) and learn, without waiting, when every one of
them is done (`through`): the non-stalling checkpoint (pending.py) writes its states
only then.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from daemon.core.records import OutputRecord
from daemon.kafka.port import Future
from daemon.streaming.delivery.order import KeyOrder, Sent


class InFlight:
    """The outputs sent since the last synchronous checkpoint, in send order, until
    their sends are done (`reap`); of those done, the ones the key-order rule sends
    again."""

    def __init__(self, note_failed: Callable[[Sent], None]) -> None:
        self.note_failed = note_failed  # the producer remembers dead letters too large
        # (number in send order, output, its acknowledgement)
        self.records: deque[tuple[int, OutputRecord, Future]] = deque()
        self.bytes = 0
        self.order = KeyOrder()
        self.added = 0  # outputs numbered so far: the next one's number

    def add(self, item: OutputRecord, future: Future) -> None:
        self.records.append((self.added, item, future))
        self.added += 1
        self.bytes += len(item.value or b"")

    def reap(self) -> None:
        """Let go of the outputs acknowledged or failed so far, in send order (only
        the done prefix: what follows an unfinished send waits for it)."""
        records = self.records
        failed: Sent = []
        while records and records[0][2].is_done:
            _, item, future = records.popleft()
            self.bytes -= len(item.value or b"")
            if not future.succeeded():
                failed.append((item, future))
            self.order.judge(item, future)
        self.note_failed(failed)

    def through(self) -> int:
        """Every output numbered below this is done (acknowledged, or failed: see
        `failing`), as of the last `reap`."""
        return self.records[0][0] if self.records else self.added

    def failing(self) -> bool:
        return bool(self.order.resend)

    def release(self, partition: int) -> None:
        """Forget input partition `partition`'s outputs, in flight or to send again."""
        self.reap()
        self.records = deque(r for r in self.records if r[1].partition != partition)
        self.bytes = sum(len(i.value or b"") for _, i, _ in self.records)
        self.order.release(partition)

    def settle(self) -> Sent:
        """All of it, in send order, to judge again: those the rule sends again, then
        those still unacknowledged; nothing is left in flight."""
        self.reap()
        settled: Sent = [*self.order.clear(), *((i, f) for _, i, f in self.records)]
        self.clear()
        return settled

    def clear(self) -> None:
        """Nothing in flight any more (the numbering goes on)."""
        self.records.clear()
        self.bytes = 0
        self.order.clear()
