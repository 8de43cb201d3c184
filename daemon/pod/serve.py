"""One daemon process: the whole pod, or one worker of it (see daemon/pod/__init__.py).

A worker has no HTTP port of its own: it reports its probes to the supervisor
(`StatusWriter`) and its metrics through the multiprocess files. Its start-up error
is left for the supervisor to print once, instead of raised.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from pathlib import Path

from daemon import __version__
from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.errors import ExitCode, StartupError, UnservableModelError
from daemon.ops import logs
from daemon.ops.health import Health
from daemon.ops.http import HttpServer
from daemon.ops.metrics import Metrics
from daemon.ops.pod import StatusWriter
from daemon.pipeline import input_fields, processor_from_settings
from daemon.pod.roles import WorkerRole, stop_on_signals
from daemon.schemas.wire import value_formats
from daemon.streaming.loop import RunLoop


def serve(settings: Settings, role: WorkerRole | None) -> int:
    """Serve until SIGTERM or SIGINT (or, in a worker, the supervisor gone): the exit code."""
    log = logs.get_logger("daemon")
    log.info("starting", version=__version__, settings=settings.loggable())

    stop = threading.Event()
    stop_on_signals(stop, log)

    metrics = Metrics()
    # Liveness allows a full max.poll.interval: beyond it the group has given up on us anyway.
    health = Health(liveness_timeout_s=settings.kafka_max_poll_interval_ms / 1000)
    reporter: HttpServer | StatusWriter
    if role is None:
        reporter = HttpServer(settings.http_port, metrics, health)
        reporter.start()
        log.info("http_listening", port=reporter.port)
    else:
        reporter = StatusWriter(health, role.status_file, stop)
        reporter.start()
    try:
        # The value formats; a pod's workers share the schemas they fetch (its directory).
        formats = value_formats(settings, input_fields(settings), role.directory if role else None)
        processor = processor_from_settings(settings, settings.model_path, metrics, formats.wire)

        # The models loaded later (a shadow, a new file at LSTMD_MODEL_PATH): their
        # metrics discard, every input is counted once, by the serving model.
        def load(path: Path) -> Processor:
            return processor_from_settings(settings, path, Metrics.discarding(), formats.wire)

        shadow = shadow_processor(settings, processor, load)
        health.model_loaded = True
        log.info("model_loaded", model=processor.model_id, engine=processor.engine.name)
        # TensorFlow, Keras and the model leave ~270,000 long-lived objects behind: a
        # full collection scanned them all (~90 ms, measured) in the middle of serving.
        # Frozen, they are never scanned again; what serving allocates still is.
        gc.collect()
        gc.freeze()
        RunLoop(
            settings,
            processor,
            metrics,
            health,
            stop,
            formats=formats,
            shadow=shadow,
            load_model=load,
        ).run()
    except StartupError as exc:
        if role is None:
            raise
        # Printed once by the supervisor; logged here too, so a worker never exits unexplained.
        log.error("startup_failed", error=str(exc), error_class=type(exc).__name__)
        role.report_startup_error(str(exc))
        return ExitCode.STARTUP
    except Exception as exc:
        # Class and message as fields of their own: a log pipeline that drops the
        # traceback still says why the process ended.
        log.exception("fatal", error=str(exc), error_class=type(exc).__name__)
        return ExitCode.ERROR
    finally:
        if isinstance(reporter, HttpServer):
            reporter.stop()
        else:
            reporter.close()
    log.info("stopped")
    return ExitCode.OK


def shadow_processor(
    settings: Settings, serving: Processor, load: Callable[[Path], Processor]
) -> Processor | None:
    """The shadow model's processor (LSTMD_SHADOW_MODEL_PATH), or None. It must read the
    serving model's inputs: another feature count is a start-up error (exit 2)."""
    if settings.shadow_model_path is None:
        return None
    shadow = load(settings.shadow_model_path)
    if shadow.n_features != serving.n_features:
        raise UnservableModelError(
            f"LSTMD_SHADOW_MODEL_PATH: {settings.shadow_model_path} takes {shadow.n_features} features "
            f"per step, the serving model {serving.n_features}: a shadow reads the same inputs"
        )
    logs.get_logger("daemon").info("shadow_model_loaded", model=shadow.model_id, engine=shadow.engine.name)
    return shadow
