"""kafka-python clients built from Settings, and the rebalance listener.

Delivery guarantee of this connector (at-least-once): the run loop sends a
batch's outputs, waits until Kafka acknowledged every one (acks=all,
idempotent producer), and only then commits the batch's input offsets. A crash
between the two repeats outputs with identical values; it never loses one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import (
    AuthorizationError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    for_code,
)

from daemon import __version__
from daemon.codec import DEAD_LETTER_VALUE_BYTES
from daemon.config import Settings
from daemon.exceptions import KafkaSetupError
from daemon.logs import get_logger

log = get_logger(__name__)

# Waiting for acknowledgements a little lets kafka-python fill larger batches
# without adding noticeable latency next to a model step.
PRODUCER_LINGER_MS = 5
# kafka-python backs off reconnects up to 30 s by default: after a broker restart
# the daemon would sit idle that long. One second keeps recovery prompt.
RECONNECT_BACKOFF_MAX_MS = 1000
# Room for a dead letter's headers and Kafka's record overhead above the largest
# value the daemon copies (see codec.DEAD_LETTER_VALUE_BYTES).
RECORD_OVERHEAD_BYTES = 64 << 10
# Compacted: only the latest state of each sequence matters. Tombstones are kept a
# day so a restore that starts just before compaction still sees deletions.
STATE_TOPIC_CONFIG = {"cleanup.policy": "compact", "delete.retention.ms": "86400000"}
# A process killed inside a transaction leaves it open, and read_committed readers
# (downstream, and our own state restore) wait behind it until the broker aborts
# it. A restarted static member fences it at once; otherwise this bounds the wait.
TRANSACTION_TIMEOUT_MS = 10_000
# send() waits this long for metadata (e.g. of a topic deleted under us) before the
# batch is retried; the default minute would stall the loop and its liveness beat.
MAX_BLOCK_MS = 10_000
# Each connection attempt at start-up gives up after this, then backs off and retries.
BOOTSTRAP_TIMEOUT_MS = 5000
# The longest wait between two attempts (to connect, produce, commit).
MAX_RETRY_DELAY_S = 30.0
# Kafka protocol error codes in a Metadata answer. A principal without Describe on a
# topic gets TOPIC_AUTHORIZATION_FAILED whether or not the topic exists.
UNKNOWN_TOPIC_OR_PARTITION = 3
TOPIC_AUTHORIZATION_FAILED = 29
# In a CreateTopics answer: someone else (another pod, an operator) created it first.
TOPIC_ALREADY_EXISTS = 36


class Backoff:
    """Doubling waits between attempts at something Kafka refuses for now, cut short
    when the daemon is asked to stop."""

    def __init__(self, stop: threading.Event, first_s: float = 0.5) -> None:
        self.stop = stop
        self.delay = first_s

    def wait(self) -> bool:
        """Wait the current delay, then double it; True if asked to stop meanwhile."""
        if self.stop.wait(self.delay):
            return True
        self.delay = min(self.delay * 2, MAX_RETRY_DELAY_S)
        return False


def security_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection settings shared by every client; the password never leaves here."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": f"lstmd-{__version__}",
        "security_protocol": settings.kafka_security_protocol,
        "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password()
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        for name in ("cafile", "certfile", "keyfile"):
            path = getattr(settings, f"kafka_ssl_{name}")
            if path is not None:
                kwargs[f"ssl_{name}"] = str(path)
    return kwargs


def make_consumer(settings: Settings) -> KafkaConsumer:
    return KafkaConsumer(
        **security_kwargs(settings),
        group_id=settings.group_id,
        group_instance_id=settings.group_instance_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Upstream producers may be transactional: never feed an aborted event to a state.
        isolation_level="read_committed",
        allow_auto_create_topics=False,
        max_poll_records=settings.kafka_max_poll_records,
        max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        # kafka-python 3 takes assignor instances; its stubs still say classes.
        partition_assignment_strategy=[CooperativeStickyAssignor()],  # type: ignore[list-item]
    )


def make_producer(settings: Settings, transactional_id: str | None = None) -> KafkaProducer:
    return KafkaProducer(
        **security_kwargs(settings),
        acks="all",
        enable_idempotence=True,
        linger_ms=PRODUCER_LINGER_MS,
        transactional_id=transactional_id,
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        max_block_ms=MAX_BLOCK_MS,
        max_request_size=max_message_bytes(settings),
    )


def max_message_bytes(settings: Settings) -> int:
    """The largest record the daemon produces: a dead letter carrying a record of up to
    LSTMD_MAX_RECORD_BYTES (at least 1 MiB), plus its headers."""
    return max(DEAD_LETTER_VALUE_BYTES, settings.max_record_bytes) + RECORD_OVERHEAD_BYTES


def make_restore_consumer(settings: Settings) -> KafkaConsumer:
    """Reads the state topic by assignment (no group), committed transactions only."""
    return KafkaConsumer(
        **security_kwargs(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 << 20,
    )


def wait_for_cluster(settings: Settings, stop: threading.Event,
                     beat: Callable[[], None] = lambda: None) -> KafkaAdminClient | None:
    """Connect an admin client, retrying with backoff until the cluster answers.

    Returns None if asked to stop first. The daemon is not ready meanwhile, and
    says why in the log once per attempt, so a pod waiting for its brokers is
    visible without being restarted.
    """
    backoff = Backoff(stop, first_s=1.0)
    attempt = 0
    while not stop.is_set():
        attempt += 1
        beat()  # waiting for brokers is not being stuck: stay live, not ready
        watch = _AuthFailureWatch()
        try:
            with watch:
                return KafkaAdminClient(**security_kwargs(settings),
                                        bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
        except (SaslAuthenticationFailedError, AuthorizationError) as exc:
            raise _refusal(settings, exc) from None
        except (KafkaTimeoutError, KafkaConnectionError) as exc:
            if watch.failure is not None:
                raise _refusal(settings, watch.failure) from None
            log.warning("kafka_unreachable", servers=settings.bootstrap_servers,
                        attempt=attempt, retry_in_s=backoff.delay, error=str(exc))
        if backoff.wait():
            break
    return None


def _refused(settings: Settings, error: Exception) -> str:
    user = settings.kafka_sasl_username
    who = f"user {user!r} with {settings.kafka_sasl_mechanism}" if user else "this client"
    return f"Kafka refused the credentials of {who}: {error}"


def _refusal(settings: Settings, error: Exception) -> KafkaSetupError:
    """Wrong credentials (authentication) or a missing ACL (authorization)."""
    if isinstance(error, AuthorizationError):
        return authorization_failure(settings, error)
    return KafkaSetupError(_refused(settings, error))


def _principal(settings: Settings) -> str:
    """Who Kafka's authorizer sees, for error messages (never a secret)."""
    if settings.kafka_sasl_username:
        return f"user {settings.kafka_sasl_username!r}"
    if settings.kafka_ssl_certfile is not None:
        return "the principal of the client certificate"
    return "User:ANONYMOUS"


def _topic_roles(settings: Settings) -> dict[str, tuple[list[str], set[str]]]:
    """{topic: (its LSTMD_* variables, the ACL operations the daemon needs on it)}.
    Describe is implied by each of them."""
    roles: dict[str, tuple[list[str], set[str]]] = {}
    for topic, variable, needs in (
        (settings.input_topic, "LSTMD_INPUT_TOPIC", {"READ"}),
        (settings.output_topic, "LSTMD_OUTPUT_TOPIC", {"WRITE"}),
        (settings.dead_letter_topic, "LSTMD_DLQ_TOPIC", {"WRITE"}),
        (settings.state_topic_name, "LSTMD_STATE_TOPIC", {"READ", "WRITE"}),
    ):
        variables, ops = roles.setdefault(topic, ([], set()))
        variables.append(variable)
        ops |= needs
    return roles


def _ops(ops: set[str]) -> str:
    return " and ".join(op.capitalize() for op in sorted(ops))


def _topic_refusal(settings: Settings, topic: str, lacking: set[str] | None = None,
                   *, hidden: bool = False) -> str:
    roles = _topic_roles(settings)
    variables, needs = roles.get(topic, ([], set()))
    where = f" ({', '.join(variables)})" if variables else ""
    lacking = lacking or needs
    need = f": it needs {_ops(lacking)} on it" if lacking else ""
    if hidden:
        need += " (Kafka answers the same for a topic that does not exist)"
    return f"not authorized to use topic {topic}{where} as {_principal(settings)}{need}"


def _topics_named(error: Exception) -> list[str]:
    """kafka-python puts the refused topic, or a set of them, in the exception's args."""
    arg = error.args[0] if error.args else None
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, (set, frozenset, list, tuple)):
        return sorted(str(t) for t in arg)
    return []


def authorization_failure(settings: Settings, error: Exception,
                          topic: str | None = None) -> KafkaSetupError:
    """A clear, permanent error for an ACL Kafka says the daemon lacks.

    Retrying cannot help (kafka-python's idempotent producer even refuses every
    later send once one was refused), so the daemon must stop and say which
    topic or group, which setting, and which principal. `topic` names the
    topic of the refused request when the exception does not.
    """
    who = _principal(settings)
    if isinstance(error, GroupAuthorizationFailedError):
        return KafkaSetupError(
            f"not authorized to use consumer group {settings.group_id} (LSTMD_GROUP_ID) as {who}: "
            "it needs Read on it")
    if isinstance(error, TopicAuthorizationFailedError):
        named = [t for t in _topics_named(error) if t in _topic_roles(settings)]
        topics = named or ([topic] if topic else [])
        if topics:
            return KafkaSetupError("; ".join(_topic_refusal(settings, t) for t in topics))
    if isinstance(error, TransactionalIdAuthorizationFailedError):
        return KafkaSetupError(
            f"not authorized to use transactional ids lstmd-{settings.group_id}-* as {who}: "
            "LSTMD_DELIVERY=exactly-once needs Write on them")
    if isinstance(error, ClusterAuthorizationFailedError):
        return KafkaSetupError(
            f"not authorized for idempotent writes as {who}: it needs Write on the output topics "
            "(or IdempotentWrite on the cluster)")
    what = f" (topic {topic})" if topic else ""
    return KafkaSetupError(f"Kafka refused a request{what} as {who}: {type(error).__name__}: {error}")


class _AuthFailureWatch(logging.Filter):
    """Catches an authentication failure that kafka-python 3.0.12 only logs.

    During bootstrap a rejected SASL password reaches the caller as a plain
    "Unable to bootstrap" timeout; the real cause is the exception its
    connection manager logs. Retrying would never help, so the daemon must
    exit with that cause instead of waiting for brokers forever.
    """

    LOGGERS = ("kafka.net.manager", "kafka.net.connection")

    def __init__(self) -> None:
        super().__init__()
        self.failure: Exception | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, (SaslAuthenticationFailedError, AuthorizationError)):
                self.failure = arg
        return True

    def __enter__(self) -> _AuthFailureWatch:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def ensure_topics(admin: KafkaAdminClient, settings: Settings) -> int:
    """Check the topics exist and the daemon may use them (or create them if allowed);
    return input partitions.

    The topics are described by name: listing them would silently leave out
    those the principal may not see, and a missing ACL would read as a missing
    topic. The consumer group is checked too, so a missing ACL ends the daemon
    at start-up with its name instead of failing deep in the consumer.

    The state topic must have as many partitions as the input (state of input
    partition p lives in state partition p) and is created compacted.
    """
    roles = _topic_roles(settings)
    described = {t["name"]: t for t in admin.describe_topics(list(roles))}
    _check_topic_acls(settings, described)
    _check_group_acl(admin, settings)
    existing = {name for name, t in described.items()
                if t["error_code"] != UNKNOWN_TOPIC_OR_PARTITION}
    if settings.input_topic not in existing and not settings.create_topics:
        raise KafkaSetupError(
            f"missing Kafka topic: {settings.input_topic} (LSTMD_INPUT_TOPIC); create it, "
            "or set LSTMD_CREATE_TOPICS=true")
    partitions = _partitions(admin, settings.input_topic) if settings.input_topic in existing else 1
    wanted: dict[str, dict[str, Any]] = {
        settings.input_topic: {"num_partitions": partitions},
        settings.output_topic: {"num_partitions": partitions},
        settings.dead_letter_topic: {"num_partitions": partitions, "configs": {
            "max.message.bytes": str(max_message_bytes(settings))}},
        settings.state_topic_name: {"num_partitions": partitions, "configs": STATE_TOPIC_CONFIG},
    }
    missing = {t: spec for t, spec in wanted.items() if t not in existing}
    if missing and not settings.create_topics:
        raise KafkaSetupError(
            f"missing Kafka topics: {', '.join(sorted(missing))} (create them, or set "
            "LSTMD_CREATE_TOPICS=true)")
    if missing:
        _create_topics(admin, settings, missing)
        log.info("topics_created", topics=sorted(missing), partitions=partitions)
        # Whoever won a creation race chose the partition count: read it back.
        partitions = _partitions(admin, settings.input_topic)
    state_partitions = _partitions(admin, settings.state_topic_name)
    if state_partitions != partitions:
        raise KafkaSetupError(
            f"state topic {settings.state_topic_name} has {state_partitions} partitions, the input "
            f"topic {settings.input_topic} has {partitions}: they must be equal")
    return partitions


def _create_topics(admin: KafkaAdminClient, settings: Settings,
                   missing: dict[str, dict[str, Any]]) -> None:
    """Create the missing topics; one created meanwhile by someone else is fine.

    Pods of one StatefulSet start together, so with LSTMD_CREATE_TOPICS=true
    they race to create the same topics: losing that race is not an error.
    """
    answer = admin.create_topics(missing, raise_errors=False)
    for topic in answer["topics"]:
        code = topic["error_code"]
        if code in (0, TOPIC_ALREADY_EXISTS):
            continue
        error: type[KafkaError] = for_code(code)  # type: ignore[no-untyped-call]
        if issubclass(error, AuthorizationError):
            raise KafkaSetupError(
                f"not authorized to create topics {', '.join(sorted(missing))} as "
                f"{_principal(settings)} (LSTMD_CREATE_TOPICS=true): create them, or grant "
                "Create on them")
        raise KafkaSetupError(
            f"could not create topic {topic['name']}: {error.__name__}: "
            f"{topic.get('error_message') or 'no message from the broker'}")
    admin.wait_for_topics(list(missing))


def _check_topic_acls(settings: Settings, described: dict[str, dict[str, Any]]) -> None:
    """Every topic the principal may not use, named in one error.

    TOPIC_AUTHORIZATION_FAILED: no Describe (Kafka does not say whether the topic
    exists). A topic it may describe but lacks Read or Write on shows in the
    operations the broker says the principal is authorized for (KIP-430).
    """
    problems = []
    for topic, (_variables, needs) in _topic_roles(settings).items():
        info = described.get(topic)
        if info is None:
            continue
        if info["error_code"] == TOPIC_AUTHORIZATION_FAILED:
            problems.append(_topic_refusal(settings, topic, hidden=True))
            continue
        allowed = info.get("authorized_operations")
        if info["error_code"] == 0 and isinstance(allowed, list) and allowed:
            lacking = needs - set(allowed)
            if lacking:
                problems.append(_topic_refusal(settings, topic, lacking))
    if problems:
        raise KafkaSetupError("; ".join(problems))


def _check_group_acl(admin: KafkaAdminClient, settings: Settings) -> None:
    """Finding the group's coordinator needs Describe on the group: without it the
    consumer would fail on its first poll. Anything else (a coordinator still
    loading, an older broker) is left to the consumer."""
    try:
        groups = admin.describe_groups([settings.group_id])
    except AuthorizationError as exc:
        raise authorization_failure(settings, exc) from None
    except KafkaError as exc:
        log.debug("group_acl_unchecked", group=settings.group_id, error=str(exc))
        return
    allowed = groups.get(settings.group_id, {}).get("authorized_operations")
    if isinstance(allowed, list) and allowed and "READ" not in allowed:
        raise authorization_failure(settings, GroupAuthorizationFailedError(settings.group_id))


def _partitions(admin: KafkaAdminClient, topic: str) -> int:
    described = admin.describe_topics([topic])
    return len(described[0]["partitions"])


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


__all__ = [
    "KafkaError",
    "RebalanceEvents",
    "authorization_failure",
    "ensure_topics",
    "make_consumer",
    "make_producer",
    "security_kwargs",
    "wait_for_cluster",
]
