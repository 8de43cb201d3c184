"""What every Kafka client the daemon opens shares, whichever library plays the port:
the connection and security settings, the non-default values (each constant says
why it was chosen), and the admin client of start-up.

The start-up checks (topics, ACLs, the state topic's record size: topics.py) run on
kafka-python's admin client with either backend: they happen once, and speak in
kafka-python's answers. The backends (backends/) build the consumers and producers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import (
    AuthorizationError,
    KafkaConnectionError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
)

from daemon import __version__
from daemon.config import Codec, Settings
from daemon.core.codec import DEAD_LETTER_VALUE_BYTES
from daemon.kafka.acl import AuthFailureWatch, refusal
from daemon.kafka.retry import Backoff
from daemon.ops.logs import get_logger

log = get_logger(__name__)

# A broker that rejects a SASL password answers so and closes the connection after
# connection.failed.authentication.delay.ms (100 ms by default); that close often
# drops the answer (3 to 8 of 8 five-second attempts in a row here, never with the
# delay at 0), so the daemon sees only disconnects. It exits 2 on the answer, and
# until one arrives says what else a disconnect during start-up can mean.
AUTHENTICATION_HINT = (
    "the broker closed the connection: on a SASL listener a wrong LSTMD_KAFKA_SASL_USERNAME "
    "or LSTMD_KAFKA_SASL_PASSWORD does this too (the daemon exits 2 once the broker says so)"
)


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
# Fetch size of the readers (restore, rebuild): state records are up to a few MiB.
RESTORE_FETCH_BYTES = 8 << 20


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
            hint: dict[str, str] = {}
            if watch.disconnected and settings.kafka_security_protocol.startswith("SASL_"):
                hint = {"hint": AUTHENTICATION_HINT}
            log.warning(
                "kafka_unreachable",
                servers=settings.bootstrap_servers,
                attempt=attempt,
                retry_in_s=backoff.delay,
                error=str(exc),
                **hint,
            )
        if backoff.wait():
            break
    return None
