"""What the run loop does with the Schema Registry: wait for it at start-up (the
output's schema registered), and hold input back while it is away.

An outage never dead-letters a record: a batch whose schemas cannot be fetched is
handed back to the consumer whole (nothing of it decoded), the partitions pause,
and the batch is read again after a backoff. The loop keeps polling meanwhile
(heartbeats, rebalances, checkpoints, SIGTERM), and readiness says why it waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from daemon.core.records import InputRecord
from daemon.kafka.retry import MAX_RETRY_DELAY_S, Backoff
from daemon.ops.health import Health
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.schemas.registry import RegistryUnavailable
from daemon.schemas.wire import ValueFormats

log = get_logger("daemon.streaming.loop")

#: The first wait after the registry did not answer; doubled up to MAX_RETRY_DELAY_S.
FIRST_RETRY_S = 1.0


def wait_for_registry(formats: ValueFormats, stop: threading.Event, health: Health) -> bool:
    """Start-up: the registry answers, with our credentials, and the output's schema is
    registered (LSTMD_OUTPUT_FORMAT). Retried with backoff while it does not answer;
    a refusal (RegistryRefused: credentials, URL, an incompatible schema) ends the
    daemon with exit 2. False if asked to stop first."""
    client = formats.client
    if client is None:
        return True
    backoff = Backoff(stop, first_s=FIRST_RETRY_S, beat=health.beat)
    attempt = 0
    while not stop.is_set():
        attempt += 1
        health.beat()
        try:
            client.ping()
            output_id = formats.output.register() if formats.output is not None else None
        except RegistryUnavailable as exc:
            health.reason = "waiting for the schema registry"
            log.warning(
                "schema_registry_unreachable",
                url=client.url,
                attempt=attempt,
                retry_in_s=backoff.delay,
                error=str(exc),
            )
            if backoff.wait():
                return False
            continue
        log.info(
            "schema_registry_ready",
            url=client.url,
            output_subject=formats.output.subject if formats.output is not None else None,
            output_schema_id=output_id,
        )
        return True
    return False


class RegistryGate:
    """Lets a batch through once the schemas it names are known; holds input back
    while the registry is away (see the module docstring)."""

    def __init__(
        self,
        formats: ValueFormats | None,
        health: Health,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inputs = formats.inputs if formats is not None else None
        self.health = health
        self.metrics = metrics
        self.clock = clock
        self.delay = FIRST_RETRY_S
        self.retry_at = 0.0
        self.down_since: float | None = None
        self._fetched = 0

    @property
    def holding(self) -> bool:
        """True while input waits for the registry (the loop pauses its partitions)."""
        return self.down_since is not None and self.clock() < self.retry_at

    def admit(self, batch: Sequence[InputRecord]) -> bool:
        """True: the batch's schemas are known, process it. False: the registry is away;
        the caller hands the whole batch back to the consumer."""
        if self.inputs is None or not batch:
            return True
        try:
            self.inputs.resolve(batch)
        except RegistryUnavailable as exc:
            self._away(str(exc), len(batch))
            return False
        finally:
            fetched = self.inputs.cache.fetched
            self.metrics.schema_fetches.inc(fetched - self._fetched)
            self._fetched = fetched
        if self.down_since is not None:
            log.info("schema_registry_back", after_s=round(self.clock() - self.down_since, 1))
            self.down_since = None
            self.delay = FIRST_RETRY_S
            self.health.blocked = None
            self.metrics.registry_waiting.set(0)
        return True

    def _away(self, error: str, held: int) -> None:
        now = self.clock()
        if self.down_since is None:
            self.down_since = now
        self.metrics.registry_unavailable.inc()
        self.metrics.registry_waiting.set(1)
        self.retry_at = now + self.delay
        log.warning(
            "schema_registry_unreachable",
            url=self.inputs.cache.client.url if self.inputs is not None else None,
            held=held,
            retry_in_s=self.delay,
            down_for_s=round(now - self.down_since, 1),
            error=error,
        )
        self.health.blocked = f"waiting for the schema registry (away for {now - self.down_since:.0f} s)"
        self.delay = min(self.delay * 2, MAX_RETRY_DELAY_S)
