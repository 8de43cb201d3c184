"""kafka-python clients built from Settings, and the kafka-python 3.0.12 workarounds they need.

Every client the daemon opens comes from here, with the same connection and
security settings; the constants say why each non-default value was chosen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import (
    AuthorizationError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
)
from kafka.producer.transaction_manager import TransactionManager

from daemon import __version__
from daemon.config import Codec, Settings
from daemon.core.codec import DEAD_LETTER_VALUE_BYTES
from daemon.kafka.acl import AuthFailureWatch, refusal
from daemon.kafka.retry import Backoff
from daemon.ops.logs import get_logger

log = get_logger(__name__)


# Waiting for acknowledgements a little lets kafka-python fill larger batches
# without adding noticeable latency next to a model step.
PRODUCER_LINGER_MS = 5
# Larger batches than kafka-python's 16 KiB: with outputs sent while the loop goes on
# (the pipelined checkpoint), 16 KiB batches (~100 predictions) made the producer's
# IO thread cost ~24 us per event; 128 KiB, ~8 (docs/performance.md). The linger,
# not the size, bounds the wait at low rates.
PRODUCER_BATCH_BYTES = 128 << 10
# kafka-python backs off reconnects up to 30 s by default: after a broker restart
# the daemon would sit idle that long. One second keeps recovery prompt.
RECONNECT_BACKOFF_MAX_MS = 1000
# Room for a dead letter's headers and Kafka's record overhead above the largest
# value the daemon copies (see codec.DEAD_LETTER_VALUE_BYTES).
RECORD_OVERHEAD_BYTES = 64 << 10
# A process killed inside a transaction leaves it open, and read_committed readers
# (downstream, and our own state restore) wait behind it until the broker aborts
# it. A restarted static member fences it at once; otherwise this bounds the wait.
TRANSACTION_TIMEOUT_MS = 10_000
# send() waits this long for metadata (e.g. of a topic deleted under us) before the
# batch is retried; the default minute would stall the loop and its liveness beat.
MAX_BLOCK_MS = 10_000
# Each connection attempt at start-up gives up after this, then backs off and retries.
BOOTSTRAP_TIMEOUT_MS = 5000
# How old a client's view of the topics may grow (kafka-python: 5 minutes). Partitions
# added to a topic while the daemon runs are seen on this clock: by the group leader's
# consumer, which then rejoins and assigns them (kafka-python 3.0.12 compares the
# metadata it assigned from with the current one: ConsumerCoordinator.need_rejoin),
# and by the producers, which refuse a partition they do not know yet. 30 s keeps a
# topic change served within a minute, for one small Metadata request per client
# every 30 s.
METADATA_MAX_AGE_MS = 30_000


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
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


def make_producer(settings: Settings, transactional_id: str | None = None) -> KafkaProducer:
    return KafkaProducer(
        **security_kwargs(settings),
        acks="all",
        enable_idempotence=True,
        linger_ms=PRODUCER_LINGER_MS,
        batch_size=PRODUCER_BATCH_BYTES,
        transactional_id=transactional_id,
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        max_block_ms=MAX_BLOCK_MS,
        max_request_size=max_message_bytes(settings),
        compression_type=compression_type(settings),
        # Building one during an outage waits this long, not kafka-python's 30 s.
        bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


def compression_type(settings: Settings) -> Codec | None:
    """LSTMD_KAFKA_COMPRESSION as kafka-python takes it (None: uncompressed). Its codec
    libraries are the daemon's dependencies, the same that decompress any input."""
    if settings.kafka_compression == "none":
        return None
    return settings.kafka_compression


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
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )


def wait_for_cluster(
    settings: Settings, stop: threading.Event, beat: Callable[[], None] = lambda: None
) -> KafkaAdminClient | None:
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
        watch = AuthFailureWatch()
        try:
            with watch:
                return KafkaAdminClient(
                    **security_kwargs(settings), bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS
                )
        except (SaslAuthenticationFailedError, AuthorizationError) as exc:
            raise refusal(settings, exc) from None
        except (KafkaTimeoutError, KafkaConnectionError) as exc:
            if watch.failure is not None:
                raise refusal(settings, watch.failure) from None
            log.warning(
                "kafka_unreachable",
                servers=settings.bootstrap_servers,
                attempt=attempt,
                retry_in_s=backoff.delay,
                error=str(exc),
            )
        if backoff.wait():
            break
    return None


def close_producer(producer: KafkaProducer, timeout: float) -> None:
    """Close, abandoning what is still unacknowledged after `timeout` (its futures fail).

    kafka-python 3.0.12's close() flushes first and raises if that flush times
    out, so it never reaches its own force-close: do that step here.
    """
    try:
        producer.close(timeout=timeout)
    except KafkaTimeoutError:
        sender = getattr(producer, "_sender", None)  # private: no public force-close
        if sender is not None and sender.is_alive():
            sender.force_close()
            sender.join(5.0)
        producer._closed = True  # type: ignore[attr-defined]


# kafka-python 3.0.12's send_offsets_to_transaction, commit_transaction and
# abort_transaction wait for the coordinator without a bound: during a broker outage
# the daemon would ignore SIGTERM until Kubernetes kills it. These make the same
# requests and wait in slices, giving up (KafkaTimeoutError) after this long or when
# `abandon` is set. A transaction given up on is fenced by the next producer with
# the same transactional id (the daemon builds one), so nothing is half-committed.
TRANSACTION_CALL_TIMEOUT_S = 30.0


def send_offsets_to_transaction(
    producer: KafkaProducer,
    offsets: dict[Any, Any],
    group: Any,
    abandon: threading.Event,
    beat: Callable[[], None],
) -> None:
    manager = _transaction_manager(producer)
    if manager is None:  # not kafka-python 3.0's producer: its own (unbounded) call
        producer.send_offsets_to_transaction(offsets, group)
        return
    _await(producer, manager.send_offsets_to_transaction(offsets, group), "offsets", abandon, beat)


def commit_transaction(producer: KafkaProducer, abandon: threading.Event, beat: Callable[[], None]) -> None:
    manager = _transaction_manager(producer)
    if manager is None:
        producer.commit_transaction()
        return
    _await(producer, manager.begin_commit(), "commit", abandon, beat)


def abort_transaction(producer: KafkaProducer, abandon: threading.Event, beat: Callable[[], None]) -> None:
    manager = _transaction_manager(producer)
    if manager is None:
        producer.abort_transaction()
        return
    _await(producer, manager.begin_abort(), "abort", abandon, beat)


def _transaction_manager(producer: KafkaProducer) -> Any:
    """kafka-python 3.0's (untyped, private) transaction manager, or None."""
    manager = getattr(producer, "_transaction_manager", None)
    return manager if isinstance(manager, TransactionManager) else None


def _await(
    producer: KafkaProducer, result: Any, what: str, abandon: threading.Event, beat: Callable[[], None]
) -> None:
    producer._sender.wakeup()  # type: ignore[attr-defined]  # as the public calls do
    deadline = time.monotonic() + TRANSACTION_CALL_TIMEOUT_S
    while not result.wait(timeout_ms=500):  # raises the request's error, if any
        beat()
        if abandon.is_set() or time.monotonic() > deadline:
            raise KafkaTimeoutError(f"transaction {what} not answered by the coordinator")


def partitions_for_topic(consumer: KafkaConsumer, topic: str, timeout_ms: int) -> set[int]:
    """The consumer's known partitions of `topic`, asking the cluster for at most
    `timeout_ms`. kafka-python 3.0.12's own `partitions_for_topic` waits for the
    metadata answer without a bound: during an outage it would not see SIGTERM."""
    cluster = getattr(consumer, "_cluster", None)
    net, manager = getattr(consumer, "_net", None), getattr(consumer, "_manager", None)
    if cluster is None or net is None or manager is None:  # another client version
        return set(consumer.partitions_for_topic(topic) or ())
    known = cluster.partitions_for_topic(topic)
    if known:
        return set(known)
    stash = cluster.need_all_topic_metadata
    cluster.need_all_topic_metadata = True
    try:
        net.run(manager.wait_for, cluster.request_update(), timeout_ms)
    except KafkaError:
        pass  # not answered in time: the caller asks again
    finally:
        cluster.need_all_topic_metadata = stash
    return set(cluster.partitions_for_topic(topic) or ())
