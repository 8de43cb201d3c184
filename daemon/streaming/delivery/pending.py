"""At-least-once checkpoints that never stall the run loop: cut, queued, and made
durable as their acknowledgements arrive.

A due checkpoint is cut by the policy as before; its outputs are sent and it joins
this queue, covering every output sent before it. Each loop step moves the queue on
without waiting (`advance`), the head only, so checkpoints complete in order:

1. once every output it covers is acknowledged (none failed) and this process is
   still a member of the group (without a transaction, the fence of every write),
   its state records are sent, about 2 ms of them per step (kafka-python's
   `send` costs 30 to 300 µs a record: a thousand states at once would be the
   very stall this avoids): a state never goes before the outputs it covers, or a crash could
   lose outputs whose inputs the watermark then skips;
2. once they are acknowledged, its offsets are committed asynchronously;
3. once the group took them, it is durable, handed back to the policy (`advance`
   returns it) and the next one becomes the head.

So an offset is still never committed before every output and state record it
covers is acknowledged, and a key's state records still go in checkpoint order.
Any trouble (an output or a state record failed, the commit failed or was deferred
by a rebalance, the member expelled, the head pending for over PENDING_LATE_S)
sets `trouble`: nothing more moves here, and
the next checkpoint takes everything pending the synchronous way (`take`; the
resend rule of order.py, then a synchronous commit), as every checkpoint did before.
Correctness first; the queue is the happy path's speed only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daemon.kafka.port import Future, GroupConsumer
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery.in_flight import InFlight
from daemon.streaming.delivery.order import Record, Sent
from daemon.streaming.policy import Checkpoint

log = get_logger(__package__ or __name__)

# Checkpoints pending at most; one more is taken the synchronous way, with them all.
# At the default interval (1 s) one is seldom pending for more than a few ms.
MAX_PENDING_CHECKPOINTS = 4
# State records are sent in chunks of this many, for at most STATE_SEND_BUDGET_S of a
# loop step (one chunk at least): kafka-python's `send` costs 30 to 300 µs a record
# on a busy 2-CPU machine, and the events polled next wait meanwhile.
STATE_SEND_CHUNK = 10
STATE_SEND_BUDGET_S = 0.002
# A checkpoint pending longer than this (outputs unacknowledged, a commit unanswered:
# a topic deleted under the daemon, a broker away) is backpressure, not a happy path:
# it goes the synchronous way, which waits, resends with a backoff and says so in
# the log (`flush_slow`, `produce_failed`). The synchronous flush waits as long.
PENDING_LATE_S = 10.0


@dataclass
class Pending:
    """One queued checkpoint: its states and offsets (its outputs are in flight)."""

    cp: Checkpoint
    covers: int  # the outputs in flight numbered below this are its (InFlight)
    cut: float  # time.perf_counter() when it was cut
    outputs_done: bool = False  # every output it covers acknowledged
    sent: Sent = field(default_factory=list)  # its state records sent so far (a prefix)
    commit: Future | None = None  # its offsets' commit, once asked


class PendingCheckpoints:
    """The queue. `send` sends records without waiting; `account` counts the state
    records acknowledged (the pipeline's)."""

    def __init__(
        self,
        in_flight: InFlight,
        send: Callable[[Sequence[Record]], Sent],
        account: Callable[[Sent], None],
        metrics: Metrics,
    ) -> None:
        self.in_flight = in_flight
        self.send = send
        self.account = account
        self.metrics = metrics
        self.queue: deque[Pending] = deque()
        self.trouble: str | None = None  # why the synchronous way is taken next

    def __len__(self) -> int:
        return len(self.queue)

    def full(self) -> bool:
        return len(self.queue) >= MAX_PENDING_CHECKPOINTS

    def add(self, cp: Checkpoint) -> None:
        """`cp`'s outputs are sent: it covers everything sent so far."""
        self.queue.append(Pending(cp, self.in_flight.added, time.perf_counter()))
        self.metrics.checkpoints_pending.set(len(self.queue))

    def advance(self, consumer: GroupConsumer) -> list[Checkpoint]:
        """Move the queue on as far as it goes without waiting; the checkpoints made
        durable (offsets committed), in order."""
        done: list[Checkpoint] = []
        while self.queue and self.trouble is None and self._durable(self.queue[0], consumer):
            head = self.queue.popleft()
            if head.cp.offsets:
                self.metrics.commits.inc()
            self.metrics.checkpoint.observe(time.perf_counter() - head.cut)
            done.append(head.cp)
        self.metrics.checkpoints_pending.set(len(self.queue))
        return done

    def _durable(self, head: Pending, consumer: GroupConsumer) -> bool:
        """The head moved on by every step it can take now; True once committed."""
        if time.perf_counter() - head.cut > PENDING_LATE_S:
            return self._fall_back(f"pending for over {PENDING_LATE_S:.0f} s")
        if not head.outputs_done:
            self.in_flight.reap()
            if self.in_flight.failing():
                return self._fall_back("an output failed")
            if self.in_flight.through() < head.covers:
                return False  # outputs it covers not yet acknowledged
            head.outputs_done = True
        if head.commit is None:
            states, sent = head.cp.states, head.sent
            if len(sent) < len(states):
                if not consumer.member():
                    return self._fall_back("expelled from the group")  # the synchronous way abandons it
                started = time.perf_counter()
                while len(sent) < len(states):
                    sent += self.send(states[len(sent) : len(sent) + STATE_SEND_CHUNK])
                    if time.perf_counter() - started >= STATE_SEND_BUDGET_S:
                        break
                if len(sent) < len(states):
                    return False  # the rest at the next steps
            if not all(f.is_done for _, f in sent):
                return False
            if not all(f.succeeded() for _, f in sent):
                return self._fall_back("a state record failed")
            self.account(sent)
            head.commit = (
                consumer.commit_async(head.cp.offsets) if head.cp.offsets else Future().success(None)
            )
        if not head.commit.is_done:
            return False
        if head.commit.failed():
            return self._fall_back(f"the offset commit failed: {head.commit.exception!r}")
        return True

    def _fall_back(self, reason: str) -> bool:
        self.trouble = reason
        log.info("checkpoint_synchronous", reason=reason, pending=len(self.queue))
        return False

    def take(self) -> list[Checkpoint]:
        """Everything pending, in order, for the synchronous way; the queue starts over.
        State records already acknowledged are left out (durable, and counted); those
        sent and not yet answered go again (identical: the compacted topic keeps one)."""
        cps = [
            Checkpoint(states=[] if p.commit is not None else p.cp.states, offsets=p.cp.offsets)
            for p in self.queue
        ]
        self.queue.clear()
        self.trouble = None
        self.metrics.checkpoints_pending.set(0)
        return cps

    def release(self, partition: int) -> None:
        """Input partition `partition` is gone: none of its states or offsets is written
        from here (its next owner goes on from the last commit)."""
        for p in self.queue:  # `sent` stays a prefix of `states`: both filtered alike
            p.cp.states = [s for s in p.cp.states if s.partition != partition]
            p.sent = [(s, f) for s, f in p.sent if s.partition != partition]
            p.cp.offsets = {tp: o for tp, o in p.cp.offsets.items() if tp.partition != partition}
