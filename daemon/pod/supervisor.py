"""The supervisor of a pod of several worker processes: it starts them, forwards a
SIGTERM, waits, and sees them through to one exit code (failure policy: see
daemon/pod/__init__.py). It holds no Kafka client and no model (an import contract).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from daemon import __version__
from daemon.config import Settings
from daemon.errors import ExitCode
from daemon.ops.http import HttpServer
from daemon.ops.logs import get_logger
from daemon.ops.pod import WorkersHealth, WorkersMetrics
from daemon.pod.roles import (
    MULTIPROC_ENV,
    WORKER_COUNT_ENV,
    WORKER_INDEX_ENV,
    startup_error_path,
    stop_on_signals,
)

log = get_logger(__name__)

#: The supervisor's directory: `<temporary directory>/lstmd-workers-<random>`.
DIRECTORY_PREFIX = "lstmd-workers-"
#: In it, a file the supervisor holds an exclusive flock on for as long as it lives.
LOCK_FILE = "supervisor.lock"

#: Beyond LSTMD_SHUTDOWN_TIMEOUT_S, what the supervisor allows the workers to exit.
SHUTDOWN_MARGIN_S = 5.0


def supervise(settings: Settings, workers: int) -> int:
    """`lstmd run` as the supervisor of `workers` worker processes: the pod's exit code.
    The workers' start-up errors are printed last, each once, as one process prints its own."""
    daemon_log = get_logger("daemon")
    daemon_log.info("starting", version=__version__, workers=workers, settings=settings.loggable())
    supervisor = Supervisor(settings, workers)
    supervisor.install_signal_handlers()
    try:
        server = HttpServer(settings.http_port, WorkersMetrics(supervisor.directory), supervisor.health)
        server.start()
        daemon_log.info("http_listening", port=server.port)
        try:
            supervisor.start()
            code = supervisor.run()
        finally:
            server.stop()
    finally:
        supervisor.cleanup()
    if supervisor.startup_errors:  # as one process says it: `lstmd: ...`, last, exit 2
        print("\n".join(f"lstmd: {message}" for message in supervisor.startup_errors), file=sys.stderr)
        return code
    daemon_log.info("stopped", code=code)
    return code


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
        #: The workers' start-up errors, each once (after `run` returned ExitCode.STARTUP).
        self.startup_errors: list[str] = []
        self.health = WorkersHealth(
            self.directory, workers, stale_after_s=settings.kafka_max_poll_interval_ms / 1000
        )

    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stop, log)

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
            return ExitCode.STARTUP
        # Stopped by the SIGTERM itself: still starting, before its handler was installed.
        codes = [
            0 if c == -signal.SIGTERM and not unexpected else c for c in (p.returncode for p in self.procs)
        ]
        if unexpected or killed or any(codes):
            log.error("workers_failed", codes=codes)
            return ExitCode.ERROR
        return ExitCode.OK

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
