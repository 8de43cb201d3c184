"""Exactly-once delivery: one Kafka transaction per checkpoint, and the policy makes
every poll batch a checkpoint.

Outputs, state records and offsets go in one transaction (KIP-447: offsets sent
with the consumer's group metadata, so a process that lost its partitions cannot
commit). Any failure aborts the transaction, labelled by its cause; the run loop
then drops its states and restores them from the state topic. Nothing is in
flight between checkpoints, so the pipelined calls of at-least-once have nothing
to do here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from daemon.core.records import OutputRecord
from daemon.kafka.errors import AuthorizationError, CommitFailedError, KafkaError
from daemon.kafka.port import GroupConsumer
from daemon.ops.logs import get_logger
from daemon.streaming.delivery.errors import (
    RECORD_REFUSALS,
    TransactionFailed,
    abort_cause,
    not_authorized,
)
from daemon.streaming.delivery.pipeline import Pipeline
from daemon.streaming.policy import Checkpoint

# The package's logger, as before delivery was split into modules.
log = get_logger(__package__ or __name__)


class Transactional(Pipeline):
    """Its producer is transactional (`Producer.transactional`)."""

    def _commit(self, consumer: GroupConsumer, cp: Checkpoint) -> bool:
        """The checkpoint's transaction, committed (True) or aborted (TransactionFailed)."""
        out = self.out
        topic: str | None = None  # of the refused record, if one was
        try:
            out.kafka.begin_transaction()
            sent = out.send([*cp.outputs, *cp.states])
            out.flush()
            failed = next(((item, f) for item, f in sent if not f.succeeded()), None)
            out.note_oversized(sent)
            if failed is not None:
                topic = out.topic(failed[0])
                raise failed[1].exception or KafkaError("a record was not acknowledged")
            # Every transaction is fenced, offsets or not (a tombstone or a notice
            # alone could otherwise land over the partitions' next owner): an expelled
            # member commits nothing, and the offsets (the policy sends those of every
            # owned partition) make the broker check the group generation (KIP-447).
            group = consumer.group_metadata()
            if not consumer.member():
                # The broker would accept offsets without a generation unchecked,
                # for partitions that another member may own now.
                raise CommitFailedError("not a member of the group any more")
            if cp.offsets:
                out.kafka.send_offsets_to_transaction(cp.offsets, group, out.abandon, out.beat)
            out.kafka.commit_transaction(out.abandon, out.beat)
        except KafkaError as exc:
            self._abort(exc, topic)
        self._account(sent)
        self.metrics.commits.inc()
        return True

    def _abort(self, exc: KafkaError, topic: str | None) -> NoReturn:
        """Abort the transaction `exc` broke (`topic`: of the record refused, if one
        was); always raises, TransactionFailed unless an ACL refused."""
        cause = abort_cause(exc)
        self.metrics.transaction_aborts.labels(cause=cause).inc()
        log.warning("transaction_aborted", error=str(exc), cause=cause, error_class=type(exc).__name__)
        # kafka-python 3.0.12 keeps a refused record's sequence numbers after the
        # abort (the next transaction fails with OutOfOrderSequenceNumber): only a
        # new producer starts clean.
        unusable = isinstance(exc, RECORD_REFUSALS)
        try:
            self.out.kafka.abort_transaction(self.out.abandon, self.out.beat)
        except KafkaError as abort_exc:
            # Fatal for this producer (e.g. its epoch was bumped because the
            # transaction outlived its timeout): the broker aborts the
            # transaction anyway; a new producer fences what is left of it.
            log.error("abort_failed", error=str(abort_exc), action="new producer")
            unusable = True
        if isinstance(exc, AuthorizationError):
            # Redoing the transaction would be refused again, forever: stop.
            raise not_authorized(self.settings, exc, topic) from None
        if unusable:
            self.out.renew()
        raise TransactionFailed(str(exc)) from exc

    # -- nothing in flight between checkpoints ------------------------------------
    def send(self, outputs: Sequence[OutputRecord]) -> None:
        """Never called: every poll batch is a checkpoint (`commit`). A transactional
        producer refuses a send outside a transaction."""
        raise TypeError("exactly-once delivery sends outputs only in a checkpoint's transaction")

    def deliver(self, consumer: GroupConsumer, cp: Checkpoint) -> None:
        """Never called: a revocation finds nothing in hand (each poll batch was
        committed in its transaction before the next poll)."""
        raise TypeError("exactly-once delivery has no checkpoint outside a transaction")

    def backlogged(self) -> bool:
        return False

    def failing(self) -> bool:
        return False

    def release(self, partition: int) -> None:
        """Nothing of the partition is in flight."""

    def restart(self) -> None:
        """A new producer fences what the old one left."""
        self.out.renew()
