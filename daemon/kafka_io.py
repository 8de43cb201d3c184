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
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
)

from daemon import __version__
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
    )


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
    delay = 1.0
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
            raise KafkaSetupError(_refused(settings, exc)) from None
        except (KafkaTimeoutError, KafkaConnectionError) as exc:
            if watch.failure is not None:
                raise KafkaSetupError(_refused(settings, watch.failure)) from None
            log.warning("kafka_unreachable", servers=settings.bootstrap_servers,
                        attempt=attempt, retry_in_s=delay, error=str(exc))
        stop.wait(delay)
        delay = min(delay * 2, 30.0)
    return None


def _refused(settings: Settings, error: Exception) -> str:
    user = settings.kafka_sasl_username
    who = f"user {user!r} with {settings.kafka_sasl_mechanism}" if user else "this client"
    return f"Kafka refused the credentials of {who}: {error}"


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
    """Check the topics exist (or create them if allowed); return input partitions.

    The state topic must have as many partitions as the input (state of input
    partition p lives in state partition p) and is created compacted.
    """
    existing = set(admin.list_topics())
    if settings.input_topic not in existing and not settings.create_topics:
        raise KafkaSetupError(
            f"missing Kafka topic: {settings.input_topic} (LSTMD_INPUT_TOPIC); create it, "
            "or set LSTMD_CREATE_TOPICS=true")
    partitions = _partitions(admin, settings.input_topic) if settings.input_topic in existing else 1
    wanted: dict[str, dict[str, Any]] = {
        settings.input_topic: {"num_partitions": partitions},
        settings.output_topic: {"num_partitions": partitions},
        settings.dead_letter_topic: {"num_partitions": partitions},
        settings.state_topic_name: {"num_partitions": partitions, "configs": STATE_TOPIC_CONFIG},
    }
    missing = {t: spec for t, spec in wanted.items() if t not in existing}
    if missing and settings.create_topics:
        admin.create_topics(missing, wait_for_metadata=True)
        log.info("topics_created", topics=sorted(missing), partitions=partitions)
    elif missing:
        raise KafkaSetupError(
            f"missing Kafka topics: {', '.join(sorted(missing))} (create them, or set "
            "LSTMD_CREATE_TOPICS=true)")
    state_partitions = _partitions(admin, settings.state_topic_name)
    if state_partitions != partitions:
        raise KafkaSetupError(
            f"state topic {settings.state_topic_name} has {state_partitions} partitions, the input "
            f"topic {settings.input_topic} has {partitions}: they must be equal")
    return partitions


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
    "ensure_topics",
    "make_consumer",
    "make_producer",
    "security_kwargs",
    "wait_for_cluster",
]
