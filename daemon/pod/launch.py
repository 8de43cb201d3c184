"""`lstmd run`: which process of the pod this one is, and serving as that.

One process when LSTMD_WORKERS is 1, else a supervisor of that many worker
processes, each of which comes back here as a worker (its role in its
environment). The configuration is validated before any worker starts: a bad one
exits 2, once.
"""

from __future__ import annotations

from daemon.config import load_settings, unknown_variables
from daemon.ops import logs
from daemon.ops.cpus import available_cpus
from daemon.pod.roles import WorkerRole, worker_settings


def run() -> int:
    """`lstmd run` in this process: the exit code."""
    from daemon.pod.serve import serve  # the model and Kafka load there, not in the supervisor
    from daemon.pod.supervisor import supervise

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    log = logs.get_logger("daemon")
    role = WorkerRole.from_environment()
    if role is not None:
        import structlog

        structlog.contextvars.bind_contextvars(worker=role.index)
        return serve(worker_settings(settings, role.index, role.workers), role)
    for name in unknown_variables():
        log.warning("unknown_variable", variable=name, hint="not an lstmd setting; a typo?")
    workers = settings.workers or available_cpus()
    if workers == 1:
        return serve(settings, None)
    return supervise(settings, workers)
