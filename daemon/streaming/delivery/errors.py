"""How delivery fails, as the run loop tells the cases apart, and how a Kafka error
that aborted a transaction is labelled.

Here rather than in daemon/errors.py: `SendRefused` is a KafkaError (it fails one
record's future like the client's own errors do) and the abort causes classify
kafka-python's errors, while daemon/errors.py must not import kafka (a contract).
"""

from __future__ import annotations

from daemon.config import Settings
from daemon.errors import KafkaSetupError
from daemon.kafka.acl import authorization_failure
from daemon.kafka.errors import (
    CommitFailedError,
    CoordinatorNotAvailableError,
    InvalidProducerEpochError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    NotCoordinatorError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumberError,
    ProducerFencedError,
    RecordListTooLargeError,
    RequestTimedOutError,
)
from daemon.ops.logs import get_logger
from daemon.ops.metrics import AbortCause

# The package's logger, as before delivery was split into modules.
log = get_logger(__package__ or __name__)

# Broker refusals of a record itself: after one, a transactional producer is unusable.
RECORD_REFUSALS = (MessageSizeTooLargeError, RecordListTooLargeError, OutOfOrderSequenceNumberError)


class SendRefused(KafkaError):
    """The client refused one record's send with an error of its own, not a KafkaError
    (kafka-python raises ValueError for a partition its metadata does not know yet,
    TypeError or AssertionError for a record it cannot serialise): that record's
    failure, retried (or its transaction aborted) like any failed send."""


class DeliveryFailed(Exception):
    """Outputs could not be published before the daemon was asked to stop."""


class TransactionFailed(Exception):
    """The checkpoint's transaction was aborted: the states in memory are suspect."""


class CheckpointAbandoned(TransactionFailed):
    """At-least-once: the group expelled this member before the checkpoint's records
    were all written. Writing them later (a state record, or a resend of an output)
    could land over newer ones of the partitions' next owner, so nothing more is
    sent: the next owner recomputes them, and the run loop restores, like after an
    abort."""


def abort_cause(exc: KafkaError) -> AbortCause:
    """Why a transaction was aborted, as its bounded metric label (declared with the
    others in daemon/ops/metrics.py; the log names the error itself)."""
    if isinstance(exc, RECORD_REFUSALS):
        return "refused"
    if isinstance(exc, (ProducerFencedError, InvalidProducerEpochError, CommitFailedError)):
        return "fenced"  # another producer with our id, or the group moved on
    if isinstance(exc, (KafkaTimeoutError, RequestTimedOutError)):
        return "timeout"
    if isinstance(
        exc,
        (
            KafkaConnectionError,
            NodeNotReadyError,
            NotLeaderForPartitionError,
            CoordinatorNotAvailableError,
            NotCoordinatorError,
        ),
    ):
        return "unavailable"
    return "other"


def not_authorized(settings: Settings, exc: Exception, topic: str | None = None) -> KafkaSetupError:
    """Kafka refused an ACL: a permanent error, never retried. Nothing past the
    refused records is committed; the daemon ends with exit code 2."""
    error = authorization_failure(settings, exc, topic)
    log.error("not_authorized", error=str(error), cause=type(exc).__name__)
    return error
