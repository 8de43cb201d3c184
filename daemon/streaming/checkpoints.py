"""Checkpoints: outputs published, and, when the policy says one is due, the changed
states and the offsets made durable with them (policy.py decides, delivery/ makes
it durable); and the checkpoint made inside a revocation callback.

At-least-once, a due checkpoint does not stall the loop: it is queued and made
durable step by step as its acknowledgements arrive (delivery/pending.py; each
`publish` moves the queue on). The loop waits, synchronously, for everything
pending only when it must: a forced checkpoint (shutdown, idle evictions, a
rebuilt partition), eviction notices among the outputs, trouble (a failed send or
commit), too many queued, and a revocation.

Kept apart from the loop because it is the one place that turns the promise "no
offset before its outputs and states" into calls: a checkpoint that aborts rewinds
the run (`recover`), one cut short by the shutdown deadline stays pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon.config import Settings
from daemon.core.records import OutputRecord
from daemon.kafka.port import TopicPartition
from daemon.ops.logs import get_logger
from daemon.streaming.delivery import DeliveryFailed, TransactionFailed
from daemon.streaming.policy import Checkpoint, CheckpointPolicy, merged
from daemon.streaming.startup import Clients

log = get_logger("daemon.streaming.loop")

# The checkpoint made inside a revocation callback holds kafka-python's IO thread
# (heartbeats wait): it gives up after this share of the session timeout, and the
# loop then rewinds to the committed offsets (a repeat, never a loss).
REVOCATION_SESSION_SHARE = 0.5


@dataclass
class Checkpoints:
    """`recover` rewinds the run to the committed offsets (assignment.py)."""

    settings: Settings
    policy: CheckpointPolicy
    clients: Clients
    recover: Callable[[], None]
    # Set before the consumer closes: its close revokes, nothing is left to save.
    closing: bool = False
    # A revocation checkpoint that failed on kafka-python's IO thread, for the loop's
    # thread to act on after poll returns (`take_revocation_failure`).
    _revocation_failure: Exception | None = None

    def publish(self, outputs: list[OutputRecord], *, force: bool = False) -> None:
        """Publish `outputs`; when the policy says a checkpoint is due, with the
        changed states and the offsets.

        Between two checkpoints the outputs sent are ahead of the committed offsets
        and states: a crash repeats them, identically, from the last checkpoint. An
        output that failed meanwhile makes the checkpoint due at once (it resends).
        At-least-once a due checkpoint is queued and each call moves the queue on
        (`advance`); the synchronous way (`_commit`) takes everything pending.
        """
        delivery, consumer = self.clients.delivery, self.clients.consumer
        for done in delivery.advance(consumer):
            self.policy.checkpointed(done, committed=True)
        failing = delivery.failing()
        if not self.policy.due(outputs, force=force or failing):
            delivery.send(outputs)  # acknowledged by the next checkpoint
            return
        cut = self.policy.next_checkpoint(outputs)
        # Notices wait: a restart must not revive a state already announced gone.
        urgent = force or failing or any(o.notice for o in outputs)
        if not urgent and (cut is None or delivery.queue(consumer, cut)):
            return  # nothing new, or queued: made durable by the next steps' `advance`
        # The synchronous way: everything pending, in order, with this one.
        cp = merged([*delivery.take_pending(), cut])
        if cp is None:
            return
        self._commit(cp)

    def _commit(self, cp: Checkpoint) -> None:
        """Make `cp` durable now, the loop waiting."""
        try:
            committed = self.clients.delivery.commit(self.clients.consumer, cp)
        except TransactionFailed:
            self.recover()
            return
        except DeliveryFailed:
            self.policy.checkpointed(cp, committed=False)  # still pending: the shutdown warning names it
            raise
        self.policy.checkpointed(cp, committed)

    def flush(self) -> None:
        """Checkpoint everything pending now (notices included)."""
        self.publish(self.policy.take_notices(), force=True)

    def before_revoke(self, revoked: set[TopicPartition]) -> dict[TopicPartition, int] | None:
        """Checkpoint what is in hand before partitions are revoked; the offsets for the
        consumer to commit (`RebalanceEvents` in daemon/kafka/port.py says why there).

        Runs on kafka-python's IO thread inside `poll()` or `close()`, while the loop's
        thread waits in that call, so the store, the policy and delivery are not
        touched by anyone else meanwhile. It never raises (kafka-python would turn it
        into an error out of `poll`): a failure is kept for the loop. The offsets stay
        pending here whatever the commit's outcome: those of the partitions kept are
        committed again by the next checkpoint, harmlessly.
        """
        if self.closing or self._revocation_failure is not None:
            return None
        delivery = self.clients.delivery
        cp = merged([*delivery.take_pending(), self.policy.next_checkpoint(self.policy.take_notices())])
        if cp is None:
            return None
        started = time.monotonic()
        budget = max(1.0, self.settings.kafka_session_timeout_ms / 1000 * REVOCATION_SESSION_SHARE)
        try:
            with delivery.within(budget):
                delivery.deliver(self.clients.consumer, cp)
        except Exception as exc:
            self._revocation_failure = exc
            log.warning(
                "revocation_checkpoint_failed",
                partitions=sorted(tp.partition for tp in revoked),
                error=str(exc),
                error_class=type(exc).__name__,
            )
            return None
        finally:
            self.policy.checkpointed(cp, committed=False)
        log.info(
            "revocation_checkpointed",
            partitions=sorted(tp.partition for tp in revoked),
            outputs=len(cp.outputs),
            states=len(cp.states),
            seconds=round(time.monotonic() - started, 3),
        )
        return cp.offsets

    def take_revocation_failure(self) -> Exception | None:
        """The failure of the last revocation checkpoint, once (None: none failed)."""
        failure, self._revocation_failure = self._revocation_failure, None
        return failure
