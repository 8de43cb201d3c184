"""A process's place in the pod: its worker role (from the environment the supervisor
gives it), its group member id, its files in the supervisor's directory, and how
every process of the pod, supervisor or not, stops on a signal.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from daemon.config import Settings
from daemon.ops.pod import status_path

#: Set by the supervisor in each worker's environment: the worker's index (0..N-1).
WORKER_INDEX_ENV = "_LSTMD_WORKER_INDEX"
#: The number of workers of the pod, for the worker's instance id.
WORKER_COUNT_ENV = "_LSTMD_WORKERS"
#: prometheus-client's multiprocess directory; the workers' health files live there too.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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


def startup_error_path(directory: Path, index: int) -> Path:
    """Where worker `index` leaves its start-up error for the supervisor to print."""
    return directory / f"startup-error-{index}.txt"


def stop_on_signals(stop: threading.Event, log: Any) -> None:
    """SIGTERM and SIGINT set `stop` (logged as `signal_received`): the loop that
    watches it checkpoints and exits, in a worker and in the supervisor alike."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
