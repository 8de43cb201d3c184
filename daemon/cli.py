"""The `lstmd` command line: run, replay, inspect, and the development commands where installed.

The development commands (demo, bench, make-demo-model) live in daemon.devtools,
which the runtime never imports and the container image leaves out: they are
registered through the `lstmd.commands` entry point group (see pyproject.toml),
so a dev install has them and the image has only run, replay and inspect.

Start-up errors (configuration, model) print one clear message and exit 2
before any connection is made; anything else unexpected exits 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from daemon import __version__
from daemon.core.processor import Processor
from daemon.core.state import StateStore
from daemon.errors import StartupError
from daemon.ops.metrics import Metrics

# TensorFlow prints C++ banners on import; operators want our JSON lines only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STARTUP = 2

# Each entry point of this group names a function that adds sub-commands to `lstmd`.
COMMANDS_GROUP = "lstmd.commands"

if TYPE_CHECKING:  # argparse's sub-parsers action is generic in typeshed only
    from collections.abc import Callable

    from daemon.config import Settings
    from daemon.workers import WorkerRole

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
    Register = Callable[[Subparsers], None]


def build_processor(
    model_path: Path,
    engine_name: str,
    metrics: Metrics,
    threads: int = 0,
    *,
    delivery: str = "at-least-once",
    max_sequences: int = 0,
    max_ended_sequences: int | None = None,
    max_record_bytes: int = 1 << 20,
    reset_on_gap: bool = False,
    publish_from_ms: int | None = None,
) -> Processor:
    """Load the model and its engine: shared by `run` and `replay` so both behave alike."""
    from daemon.inference.engines.factory import make_engine  # TensorFlow loads here, not at import
    from daemon.inference.model import load_model

    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
    model = load_model(model_path)
    engine, refused = make_engine(engine_name, model)
    if refused is not None:
        from daemon.ops import logs

        logs.get_logger("daemon").warning(
            "fast_engine_refused",
            reason=refused,
            engine=engine.name,
            message=f"fast engine refused: {refused}; using {engine.name}",
        )
    metrics.model_info.labels(
        name=model.identity.name,
        sha256=model.identity.sha256,
        features=str(model.n_features),
        outputs=str(model.output_width),
    ).set(1)
    metrics.describe(engine=engine.name, delivery=delivery)
    return Processor(
        engine,
        model_id=str(model.identity),
        n_features=model.n_features,
        store=StateStore(max_sequences, max_ended_sequences),
        metrics=metrics,
        max_record_bytes=max_record_bytes,
        reset_on_gap=reset_on_gap,
        state_shapes=model.state_shapes,
        publish_from_ms=publish_from_ms,
    )


def cmd_run(_args: argparse.Namespace) -> int:
    """The daemon: one process when LSTMD_WORKERS is 1, else a supervisor of that many
    worker processes (daemon/workers.py), each of which comes back here as a worker.
    The configuration is validated before any worker starts: a bad one exits 2, once."""
    from daemon.config import load_settings, unknown_variables
    from daemon.ops import logs
    from daemon.ops.cpus import available_cpus
    from daemon.workers import WorkerRole, worker_settings

    settings = load_settings()
    logs.configure(settings.log_level, settings.log_format)
    log = logs.get_logger("daemon")
    role = WorkerRole.from_environment()
    if role is not None:
        import structlog

        structlog.contextvars.bind_contextvars(worker=role.index)
        return _serve(worker_settings(settings, role.index, role.workers), role)
    for name in unknown_variables():
        log.warning("unknown_variable", variable=name, hint="not an lstmd setting; a typo?")
    workers = settings.workers or available_cpus()
    if workers == 1:
        return _serve(settings, None)
    return _supervise(settings, workers)


def _supervise(settings: Settings, workers: int) -> int:
    from daemon.ops import logs
    from daemon.ops.http import HttpServer
    from daemon.workers import Supervisor, WorkersMetrics

    log = logs.get_logger("daemon")
    log.info("starting", version=__version__, workers=workers, settings=settings.loggable())
    supervisor = Supervisor(settings, workers)
    supervisor.install_signal_handlers()
    try:
        server = HttpServer(settings.http_port, WorkersMetrics(supervisor.directory), supervisor.health)
        server.start()
        log.info("http_listening", port=server.port)
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
    log.info("stopped", code=code)
    return code


def _serve(settings: Settings, role: WorkerRole | None) -> int:
    """One daemon process: the whole pod, or one worker of it (no HTTP port of its own:
    it reports its probes to the supervisor, its metrics through the multiprocess files)."""
    from daemon.ops import logs
    from daemon.ops.health import Health
    from daemon.ops.http import HttpServer
    from daemon.streaming.loop import RunLoop
    from daemon.workers import StatusWriter

    log = logs.get_logger("daemon")
    log.info("starting", version=__version__, settings=settings.loggable())

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

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
        processor = build_processor(
            settings.model_path,
            settings.engine,
            metrics,
            settings.tf_intra_op_threads,
            delivery=settings.delivery,
            max_sequences=settings.max_sequences,
            max_ended_sequences=settings.max_ended_sequences,
            max_record_bytes=settings.max_record_bytes,
            reset_on_gap=settings.step_gap == "reset",
            publish_from_ms=settings.publish_from_ms,
        )
        health.model_loaded = True
        log.info("model_loaded", model=processor.model_id, engine=processor.engine.name)
        RunLoop(settings, processor, metrics, health, stop).run()
    except StartupError as exc:
        if role is None:
            raise
        # Printed once by the supervisor; logged here too, so a worker never exits unexplained.
        log.error("startup_failed", error=str(exc), error_class=type(exc).__name__)
        role.report_startup_error(str(exc))
        return EXIT_STARTUP
    except Exception as exc:
        # Class and message as fields of their own: a log pipeline that drops the
        # traceback still says why the process ended.
        log.exception("fatal", error=str(exc), error_class=type(exc).__name__)
        return EXIT_ERROR
    finally:
        if isinstance(reporter, HttpServer):
            reporter.stop()
        else:
            reporter.close()
    log.info("stopped")
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from daemon.config import load_pipeline_settings
    from daemon.ops import logs
    from daemon.replay import replay

    # The daemon's pipeline variables (LSTMD_ENGINE, ...), each flag overriding its
    # variable, so a replay reproduces what `lstmd run` does with the same environment.
    settings = load_pipeline_settings(
        engine=args.engine,
        step_gap=args.step_gap,
        max_record_bytes=args.max_record_bytes,
        max_sequences=args.max_sequences,
    )
    logs.configure("WARNING", "console")  # on stderr: stdout may carry the predictions
    processor = build_processor(
        Path(args.model),
        settings.engine,
        Metrics(),
        settings.tf_intra_op_threads,
        max_sequences=settings.max_sequences,
        max_record_bytes=settings.max_record_bytes,
        reset_on_gap=settings.step_gap == "reset",
    )
    out = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: SIM115
    dead = open(args.dlq, "wb") if args.dlq else sys.stderr.buffer  # noqa: SIM115
    try:
        with open(args.input, "rb") as source:
            predicted, rejected = replay(processor, source, out, dead)
    finally:
        out.flush()
        dead.flush()
    print(
        f"lstmd replay: {predicted} predictions, {rejected} rejected; engine {processor.engine.name}",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Answers before a deployment what `lstmd run` would do with a model file:
    it loads and self-checks the model exactly as the daemon does (same refusals,
    same exit 2), then reports instead of serving."""
    import json
    import math

    from daemon.config import load_pipeline_settings
    from daemon.inference.engines.factory import make_engine
    from daemon.inference.formats import FORMAT_NAMES
    from daemon.inference.model import SELF_CHECK_STEPS, load_model
    from daemon.inference.tolerance import ATOL
    from daemon.ops import logs

    settings = load_pipeline_settings(engine=args.engine)
    logs.configure("WARNING", "console")
    model = load_model(Path(args.model))  # runs the start-up self-check, as `lstmd run` does
    fast, fast_refused = make_engine("fast", model)
    serving = fast if settings.engine == "fast" else make_engine(settings.engine, model)[0]
    report = {
        "model": str(model.identity),
        "sha256": model.identity.sha256,
        "format": FORMAT_NAMES[model.file_format],
        "translated": list(model.translations),
        "layers": model.layer_kinds,
        "input_features": model.n_features,
        "output_width": model.output_width,
        "engine": {
            "configured": settings.engine,
            "serving": serving.name,
            "with_fast": fast.name,
            "fast_refused": fast_refused,
        },
        "state_shapes": [list(shape) for shape in model.state_shapes],
        "state_bytes_per_sequence": 4 * sum(math.prod(shape) for shape in model.state_shapes),
        "self_check": f"passed: {SELF_CHECK_STEPS} steps one at a time equal the whole prefixes "
        f"(tolerance {ATOL:g})",
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    fast_line = "fast" if fast_refused is None else f"{fast.name}, fast refused: {fast_refused}"
    rows = [
        ("model", f"{report['model']} (sha256 {model.identity.sha256})"),
        (
            "format",
            FORMAT_NAMES[model.file_format]
            + (f"; translated: {'; '.join(model.translations)}" if model.translations else ""),
        ),
        ("layers", ", ".join(model.layer_kinds)),
        ("input", f"{model.n_features} features per event"),
        ("output", f"{model.output_width} values per event"),
        ("engine", f"{serving.name} (LSTMD_ENGINE={settings.engine}); with LSTMD_ENGINE=fast: {fast_line}"),
        (
            "state",
            f"{report['state_bytes_per_sequence']} bytes per open sequence (float32, shapes "
            f"{', '.join(str(tuple(s)) for s in model.state_shapes)})",
        ),
        ("self-check", str(report["self_check"])),
    ]
    for name, text in rows:
        print(f"{name:<11} {text}")
    return EXIT_OK


def _load_commands(entry_point: EntryPoint) -> Register | None:
    """The entry point's register function, or None when its module is not installed
    (an image built without daemon.devtools still carries the entry point in the
    package metadata). Any other failure, such as a dependency of that module missing,
    is a bug to see, not a command to hide: it propagates."""
    try:
        register: Register = entry_point.load()
    except ModuleNotFoundError as exc:
        module = entry_point.module
        if exc.name is not None and (module == exc.name or module.startswith(f"{exc.name}.")):
            return None
        raise
    return register


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lstmd", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--version", action="version", version=f"lstmd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="the daemon, configured by LSTMD_* variables").set_defaults(func=cmd_run)
    r = sub.add_parser("replay", help="the same pipeline over a JSON-lines file, no broker")
    r.add_argument("--model", required=True, help="a .keras, .h5 or .hdf5 model file")
    r.add_argument("--input", required=True, help='JSON lines of {"key": ..., "value": {...}}')
    r.add_argument("--output", help="prediction lines (default: stdout)")
    r.add_argument("--dlq", help="rejected-record lines (default: stderr)")
    r.add_argument(
        "--engine",
        choices=("keras", "fast"),
        help="inference engine (default: LSTMD_ENGINE, else keras); fast falls back to keras, "
        "with a warning, for a model it cannot serve",
    )
    r.add_argument("--step-gap", choices=("continue", "reset"), help="default: LSTMD_STEP_GAP, else continue")
    r.add_argument("--max-record-bytes", type=int, help="default: LSTMD_MAX_RECORD_BYTES, else 1 MiB")
    r.add_argument("--max-sequences", type=int, help="default: LSTMD_MAX_SEQUENCES, else 100000")
    r.set_defaults(func=cmd_replay)
    i = sub.add_parser("inspect", help="what a model file is and how lstmd would serve it")
    i.add_argument("model", help="a .keras, .h5 or .hdf5 model file")
    i.add_argument("--engine", choices=("keras", "fast"), help="default: LSTMD_ENGINE, else keras")
    i.add_argument("--json", action="store_true", help="one JSON object instead of text")
    i.set_defaults(func=cmd_inspect)
    for entry_point in entry_points(group=COMMANDS_GROUP):
        register = _load_commands(entry_point)
        if register is not None:
            register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except StartupError as exc:
        print(f"lstmd: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return EXIT_OK
