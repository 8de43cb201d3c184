"""Delivery: making a checkpoint durable in Kafka, in order, through faults.

What a checkpoint carries and when one is due is the policy's (policy.py); this
package publishes it, in the mode LSTMD_DELIVERY picks at start-up
(`make_delivery`):

* at-least-once (at_least_once.py): outputs are sent between checkpoints; a
  checkpoint is queued (pending.py) and, as the acknowledgements arrive, its
  state records are written, then its input offsets committed, without the run
  loop waiting; after trouble, at a revocation and at shutdown a checkpoint waits
  for the acknowledgements instead, resends what failed, writes the state
  records, then commits the offsets;
* exactly-once (transactional.py): outputs, state records and offsets in one
  Kafka transaction per checkpoint (every poll batch).

Both send through one producer wrapper (producer.py: every producer call) and
resend after a failure by one rule (order.py: from a key's first failure on, its
later records go again). `Delivery` is what the run loop calls, in either mode.

A planned revocation (a worker or pod joining, this one leaving) is checkpointed
inside the consumer's revocation callback (`RebalanceEvents` in
daemon/kafka/port.py; `Checkpoints.before_revoke`): outputs and states acknowledged (`deliver`, bounded by
`within`), offsets committed within the generation that revoked them, so the next
owner repeats nothing. A lost partition's uncommitted work is dropped: its next
owner recomputes it from the last checkpoint. docs/guarantees.md states what each
mode promises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from daemon.config import Settings
from daemon.core.records import OutputRecord
from daemon.kafka.port import GroupConsumer, RecordProducer
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery.at_least_once import AtLeastOnce
from daemon.streaming.delivery.errors import (
    CheckpointAbandoned,
    DeliveryFailed,
    SendRefused,
    TransactionFailed,
    abort_cause,
)
from daemon.streaming.delivery.producer import Producer
from daemon.streaming.delivery.transactional import Transactional
from daemon.streaming.policy import Checkpoint

__all__ = [
    "AtLeastOnce",
    "CheckpointAbandoned",
    "Delivery",
    "DeliveryFailed",
    "SendRefused",
    "TransactionFailed",
    "Transactional",
    "abort_cause",
    "make_delivery",
]


class Delivery(Protocol):
    """What the run loop asks of delivery, in either mode."""

    # Outputs go to their input's partition number (the run loop sets it from the
    # topics' partition counts; a send finding the output topic short clears it).
    same_partitions: bool

    @property
    def producer(self) -> RecordProducer:
        """The producer in use (its metadata tells the topics' partition counts)."""
        ...

    def commit(self, consumer: GroupConsumer, cp: Checkpoint) -> bool:
        """Make `cp` durable; False if the group would not take its offsets (they stay
        pending). Raises TransactionFailed (restore), DeliveryFailed (shutdown)."""
        ...

    def send(self, outputs: Sequence[OutputRecord]) -> None:
        """Outputs between checkpoints (at-least-once), acknowledged by the next."""
        ...

    def queue(self, consumer: GroupConsumer, cp: Checkpoint) -> bool:
        """Send `cp`'s outputs and queue it, without waiting (at-least-once); False:
        take it the synchronous way (`commit`), with everything `take_pending` gives."""
        ...

    def advance(self, consumer: GroupConsumer) -> list[Checkpoint]:
        """Move the queued checkpoints on without waiting; those committed, in order."""
        ...

    def take_pending(self) -> list[Checkpoint]:
        """The queued checkpoints not yet committed, in order; the queue empties."""
        ...

    def deliver(self, consumer: GroupConsumer, cp: Checkpoint) -> None:
        """`cp`'s records acknowledged, its offsets left to commit (a revocation)."""
        ...

    def backlogged(self) -> bool:
        """Too much in flight: the run loop stops fetching a while."""
        ...

    def failing(self) -> bool:
        """Something sent between checkpoints failed: a checkpoint is due now."""
        ...

    def release(self, partition: int) -> None:
        """The input partition was revoked: nothing of it is sent again."""
        ...

    def restart(self) -> None:
        """After a delivery given up on: forget what is in flight, new producer."""
        ...

    def within(self, seconds: float) -> AbstractContextManager[None]:
        """Every wait and retry inside gives up after `seconds`."""
        ...

    def close(self, timeout: float) -> None: ...


def make_delivery(
    settings: Settings,
    make_producer: Callable[[], RecordProducer],
    metrics: Metrics,
    stop: threading.Event,
    *,
    abandon: threading.Event | None = None,
    beat: Callable[[], None] = lambda: None,
) -> AtLeastOnce | Transactional:
    """The pipeline of `settings.delivery`, with a producer ready to send (waited for
    while the cluster does not answer; DeliveryFailed if `stop` is set meanwhile).
    `abandon` defaults to `stop`; `Producer` says what each of the three is for."""
    transactional = settings.delivery == "exactly-once"
    out = Producer(
        settings,
        make_producer,
        transactional=transactional,
        stop=stop,
        abandon=abandon if abandon is not None else stop,
        beat=beat,
    )
    return Transactional(out, metrics) if transactional else AtLeastOnce(out, metrics)
