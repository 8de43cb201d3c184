"""The pod's probes and metrics when it runs several worker processes (LSTMD_WORKERS).

The supervisor (daemon/pod/supervisor.py) serves the pod's one HTTP port:

* `/metrics`: prometheus-client's multiprocess mode. Every worker writes its values
  to files in the supervisor's directory (PROMETHEUS_MULTIPROC_DIR); at each scrape
  `WorkersMetrics` adds counters and histograms up and combines each gauge as it
  says (see daemon/ops/metrics.py).
* `/livez`, `/readyz`: each worker writes its own probes' answers to a small JSON
  file in the same directory every second (`StatusWriter`, `health-<i>.json`,
  replaced atomically); `WorkersHealth` answers for the pod: live only if every
  worker is, and ready only if every worker is. A worker with no fresh file for
  LSTMD_KAFKA_MAX_POLL_INTERVAL_MS (none written since it started, or its last one
  that old) is not live.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from daemon.ops.health import Health
from daemon.ops.logs import get_logger

log = get_logger(__name__)

#: A worker rewrites its health file this often.
STATUS_INTERVAL_S = 1.0


def status_path(directory: Path, index: int) -> Path:
    """Worker `index`'s health file in the supervisor's directory."""
    return directory / f"health-{index}.json"


class StatusWriter:
    """A worker's probes, written to its health file every STATUS_INTERVAL_S from a
    thread of its own (answers while the poll loop is busy, as the HTTP thread
    does in a one-process pod). It also watches the supervisor: if it is gone
    (its parent changed), the worker stops as on SIGTERM instead of running on
    as an orphan."""

    def __init__(self, health: Health, path: Path, stop: threading.Event) -> None:
        self.health = health
        self.path = path
        self.stop = stop
        self._parent = os.getppid()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lstmd-worker-status", daemon=True)

    def start(self) -> None:
        self.write()
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def write(self) -> None:
        live, live_why = self.health.live()
        ready, ready_why = self.health.ready()
        status = {
            "pid": os.getpid(),
            "at": time.time(),
            "live": live,
            "live_reason": live_why,
            "ready": ready,
            "ready_reason": ready_why,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._done.wait(STATUS_INTERVAL_S):
            if os.getppid() != self._parent and not self.stop.is_set():
                log.warning("supervisor_gone", action="stopping")
                self.stop.set()
            try:
                self.write()
            except OSError as exc:  # the directory removed under us: the pod is stopping
                log.warning("worker_status_unwritten", error=str(exc))


class WorkersHealth:
    """The pod's probes from its workers' health files: live only if every worker is
    live, ready only if every worker is ready. A worker that has not written yet is
    starting (live, not ready) for `stale_after_s` from `started_at` (when the
    supervisor started the workers); past that it hung before its first write (its
    first comes before the model loads): not live. One whose file is older than
    `stale_after_s` is stuck (its status thread would have written): not live."""

    def __init__(self, directory: Path, workers: int, stale_after_s: float) -> None:
        self.directory = directory
        self.workers = workers
        self.stale_after_s = stale_after_s
        self.started_at: float | None = None  # wall clock, set when the workers start

    def _statuses(self) -> list[tuple[int, dict[str, Any] | None]]:
        out: list[tuple[int, dict[str, Any] | None]] = []
        for i in range(self.workers):
            try:
                out.append((i, json.loads(status_path(self.directory, i).read_text())))
            except (OSError, ValueError):
                out.append((i, None))
        return out

    def live(self) -> tuple[bool, str]:
        problems = []
        now = time.time()
        for i, status in self._statuses():
            if status is None:
                silent = now - self.started_at if self.started_at is not None else 0.0
                if silent > self.stale_after_s:
                    problems.append(f"worker {i}: no status since it started {silent:.0f}s ago")
                continue  # starting
            if now - float(status["at"]) > self.stale_after_s:
                problems.append(f"worker {i}: no status for {now - float(status['at']):.0f}s")
            elif not status["live"]:
                problems.append(f"worker {i}: {status['live_reason']}")
        return (False, "; ".join(problems)) if problems else (True, "ok")

    def ready(self) -> tuple[bool, str]:
        problems = []
        for i, status in self._statuses():
            if status is None:
                problems.append(f"worker {i}: starting")
            elif not status["ready"]:
                problems.append(f"worker {i}: {status['ready_reason']}")
        return (False, "; ".join(problems)) if problems else (True, "ok")


class WorkersMetrics:
    """The pod's metrics: every worker's, aggregated by prometheus-client's
    MultiProcessCollector from the multiprocess directory at each scrape."""

    def __init__(self, directory: Path) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(directory))  # type: ignore[no-untyped-call]

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
