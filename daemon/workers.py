"""More than one worker process per pod (`LSTMD_WORKERS`): the supervisor and its workers.

Why processes: the daemon is bound by kafka-python's per-record Python (fetch
parsing, `producer.send`) under one GIL, so a second core is only used by a second
interpreter. Each worker is a whole daemon: `python -m daemon run` started again
with an internal worker index (`_LSTMD_WORKER_INDEX`, not an `LSTMD_` setting),
its own consumer in the group, its own producer, state store, model and engine.
A fresh interpreter rather than `fork`: TensorFlow and kafka-python's threads do
not survive a fork, and the worker runs exactly the code path of a one-process pod.
Subprocess rather than multiprocessing's `spawn`: nothing is pickled, and a worker
is what an operator could start by hand.

The supervisor (the process `lstmd run` started) loads no model and holds no Kafka
client. It validates the configuration first (a bad one exits 2 before any worker
starts), then starts the workers and serves the pod's one HTTP port:

* `/metrics`: prometheus-client's multiprocess mode. Every worker writes its values
  to files in a directory of its own (PROMETHEUS_MULTIPROC_DIR, made fresh in the
  temporary directory and removed at exit; see `claim_directory` for one left
  behind by a supervisor that was killed); the supervisor's MultiProcessCollector
  adds counters and histograms up and combines each gauge as it says (see
  daemon/ops/metrics.py).
* `/livez`, `/readyz`: each worker writes its own probes' answers to a small JSON
  file in the same directory every second (`health-<i>.json`, replaced atomically);
  the pod is live only if every worker is, and ready only if every worker is. A
  worker with no fresh file for LSTMD_KAFKA_MAX_POLL_INTERVAL_MS (none written
  since it started, or its last one that old) is not live.

Static membership: with `LSTMD_GROUP_INSTANCE_ID=<id>`, worker i is the group
member `<id>-w<i>` (and so its exactly-once transactional id differs too); a
one-worker pod keeps `<id>` itself.

Failure policy: SIGTERM or SIGINT is forwarded to every worker, which checkpoints
and exits as a one-process daemon does; the supervisor waits up to
LSTMD_SHUTDOWN_TIMEOUT_S plus a margin and exits 0 if every worker exited 0. A
worker that exits on its own (a crash, an unrecoverable Kafka error) stops the
others and the supervisor exits non-zero: Kubernetes restarts the pod. Restarting
the one worker in place would hide a crash loop from the pod's restart count and
its back-off, and the group rebalances either way. A worker's start-up error (an
unservable model, a missing topic) is written to its directory, not printed: the
supervisor prints each distinct message once and exits 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from daemon.config import Settings
from daemon.ops.health import Health
from daemon.ops.logs import get_logger

log = get_logger(__name__)

#: Set by the supervisor in each worker's environment: the worker's index (0..N-1).
WORKER_INDEX_ENV = "_LSTMD_WORKER_INDEX"
#: The number of workers of the pod, for the worker's instance id.
WORKER_COUNT_ENV = "_LSTMD_WORKERS"
#: prometheus-client's multiprocess directory; the workers' health files live there too.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The supervisor's directory: `<temporary directory>/lstmd-workers-<random>`.
DIRECTORY_PREFIX = "lstmd-workers-"
#: In it, a file the supervisor holds an exclusive flock on for as long as it lives.
LOCK_FILE = "supervisor.lock"

#: A worker rewrites its health file this often.
STATUS_INTERVAL_S = 1.0
#: Beyond LSTMD_SHUTDOWN_TIMEOUT_S, what the supervisor allows the workers to exit.
SHUTDOWN_MARGIN_S = 5.0
#: EXIT codes, as daemon.cli's (not imported: the cli imports this module).
EXIT_OK, EXIT_ERROR, EXIT_STARTUP = 0, 1, 2


def instance_id(base: str | None, index: int, workers: int) -> str | None:
    """Worker `index`'s group.instance.id: `<base>-w<index>` in a pod of several
    workers, `base` itself in a one-worker pod (as before workers existed), None
    without static membership."""
    if base is None or workers == 1:
        return base
    return f"{base}-w{index}"


def worker_settings(settings: Settings, index: int, workers: int) -> Settings:
    """The pod's settings as worker `index` uses them: its own static member id."""
    member = instance_id(settings.group_instance_id, index, workers)
    return settings.model_copy(update={"group_instance_id": member})


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process knows of its place in the pod (from its environment)."""

    index: int
    workers: int
    directory: Path

    @staticmethod
    def from_environment(environ: dict[str, str] | None = None) -> WorkerRole | None:
        env = dict(os.environ) if environ is None else environ
        if WORKER_INDEX_ENV not in env:
            return None
        return WorkerRole(int(env[WORKER_INDEX_ENV]), int(env[WORKER_COUNT_ENV]), Path(env[MULTIPROC_ENV]))

    @property
    def status_file(self) -> Path:
        return status_path(self.directory, self.index)

    def report_startup_error(self, message: str) -> None:
        """For the supervisor to print once (N workers fail alike on one bad model)."""
        startup_error_path(self.directory, self.index).write_text(message)


def status_path(directory: Path, index: int) -> Path:
    return directory / f"health-{index}.json"


def startup_error_path(directory: Path, index: int) -> Path:
    return directory / f"startup-error-{index}.txt"


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


def claim_directory(parent: Path | None = None) -> tuple[Path, int]:
    """A fresh directory for the workers' files, and the descriptor of its lock.

    First, the directories of supervisors that are gone are removed. In a container
    the temporary directory is an emptyDir that outlives the container, so every
    supervisor killed (SIGKILL after the grace period, the OOM killer) would leave
    its metrics files behind, restart after restart. Whether a directory's supervisor
    is gone is asked of the kernel, not guessed from a PID (PIDs repeat: in a
    container the supervisor is PID 1 every time): it holds an exclusive flock on
    the directory's LOCK_FILE for as long as it lives, and the kernel releases a
    dead process's locks, however it died. A directory whose lock can be taken is
    stale; one without a lock file (not lstmd's, or being made) is left alone.
    The lock is taken before its file gets its name, so a directory is never seen
    with a lock file that nobody holds yet.
    """
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    for stale in parent.glob(f"{DIRECTORY_PREFIX}*"):
        if _abandoned(stale / LOCK_FILE):
            shutil.rmtree(stale, ignore_errors=True)
            log.info("stale_worker_directory_removed", directory=str(stale))
    directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=parent))
    making = directory / f"{LOCK_FILE}.new"
    fd = os.open(making, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(making, directory / LOCK_FILE)
    return directory, fd


def _abandoned(lock: Path) -> bool:
    """Whether nobody holds `lock` (then this process holds it, until it is removed)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False  # no lock file: not a supervisor's directory, or one being made
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its supervisor lives
    finally:
        os.close(fd)  # releases the lock if it was taken: removed right after anyway
    return True


class Supervisor:
    """Starts `workers` worker processes and sees them through to one exit code (see
    the module docstring). `command` is what a worker runs (the daemon by default;
    tests pass a dummy)."""

    def __init__(
        self,
        settings: Settings,
        workers: int,
        *,
        command: list[str] | None = None,
        directory: Path | None = None,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.command = command or [sys.executable, "-m", "daemon", "run"]
        self._lock: int | None = None
        if directory is None:
            directory, self._lock = claim_directory()
        self.directory = directory
        self.stop = threading.Event()
        self.procs: list[subprocess.Popen[bytes]] = []
        #: The workers' start-up errors, each once (after `run` returned EXIT_STARTUP).
        self.startup_errors: list[str] = []
        self.health = WorkersHealth(
            self.directory, workers, stale_after_s=settings.kafka_max_poll_interval_ms / 1000
        )

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def start(self) -> None:
        for i in range(self.workers):
            env = dict(os.environ)
            env |= {
                WORKER_INDEX_ENV: str(i),
                WORKER_COUNT_ENV: str(self.workers),
                MULTIPROC_ENV: str(self.directory),
            }
            self.procs.append(subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL))
        self.health.started_at = time.time()
        log.info("workers_started", workers=self.workers, pids=[p.pid for p in self.procs])

    def run(self) -> int:
        """Wait for the workers to exit (after a signal, or the first to exit on its
        own); the pod's exit code."""
        unexpected: list[tuple[int, int]] = []
        exited: set[int] = set()
        deadline: float | None = None
        killed = False
        while len(exited) < len(self.procs):
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None or i in exited:
                    continue
                exited.add(i)
                self._forget(proc.pid)
                if not self.stop.is_set():
                    unexpected.append((i, code))
                    log.error("worker_exited", worker=i, pid=proc.pid, code=code, action="stopping the rest")
                    self.stop.set()
                else:
                    log.info("worker_stopped", worker=i, pid=proc.pid, code=code)
            if self.stop.is_set() and deadline is None:
                deadline = time.monotonic() + self.settings.shutdown_timeout_s + SHUTDOWN_MARGIN_S
                self._signal_all(signal.SIGTERM)
            if deadline is not None and time.monotonic() > deadline and not killed:
                left = [i for i in range(len(self.procs)) if i not in exited]
                log.error("workers_killed", workers=left, reason="not stopped within the shutdown timeout")
                self._signal_all(signal.SIGKILL)
                killed = True
            time.sleep(0.05)
        return self._exit_code(unexpected, killed)

    def _signal_all(self, signum: signal.Signals) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def _forget(self, pid: int) -> None:
        """A worker gone: its live gauges leave the aggregate (its counters stay)."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]

    def _exit_code(self, unexpected: list[tuple[int, int]], killed: bool) -> int:
        messages = []
        for i in range(len(self.procs)):
            path = startup_error_path(self.directory, i)
            if path.exists():
                message = path.read_text().strip()
                if message not in messages:
                    messages.append(message)
        if messages:
            self.startup_errors = messages
            return EXIT_STARTUP
        # Stopped by the SIGTERM itself: still starting, before its handler was installed.
        codes = [
            0 if c == -signal.SIGTERM and not unexpected else c for c in (p.returncode for p in self.procs)
        ]
        if unexpected or killed or any(codes):
            log.error("workers_failed", codes=codes)
            return EXIT_ERROR
        return EXIT_OK

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
