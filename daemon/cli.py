"""The `lstmd` command line: run, replay, inspect, and the development commands where installed.

It parses arguments and dispatches: `run` to the pod (daemon/pod), `replay` to the
file pipeline (daemon/replay.py, built as the daemon's by daemon/pipeline.py),
`inspect` to the model loader.

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
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import __version__
from daemon.errors import ExitCode, StartupError

# TensorFlow prints C++ banners on import; operators want our JSON lines only.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Each entry point of this group names a function that adds sub-commands to `lstmd`.
COMMANDS_GROUP = "lstmd.commands"

if TYPE_CHECKING:  # argparse's sub-parsers action is generic in typeshed only
    from collections.abc import Callable

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
    Register = Callable[[Subparsers], None]


def cmd_run(_args: argparse.Namespace) -> int:
    """The daemon: one process, or the supervisor of the pod's worker processes (daemon/pod)."""
    from daemon.pod.launch import run

    return run()


def cmd_replay(args: argparse.Namespace) -> int:
    from daemon import plot
    from daemon.config import load_pipeline_settings
    from daemon.ops import logs
    from daemon.ops.metrics import Metrics
    from daemon.pipeline import processor_from_settings
    from daemon.replay import SeriesCollector, panels, replay

    if args.plot_keys and not args.plot:
        raise StartupError("--plot-keys names the keys to draw: it needs --plot FILE")
    if args.plot:
        # What would fail the picture at the end fails now, before the replay's work:
        # matplotlib is an extra, not in the image.
        plot.require_matplotlib()
        if not Path(args.plot).parent.is_dir():
            raise StartupError(f"--plot {args.plot}: no such directory {str(Path(args.plot).parent)!r}")
    collector = SeriesCollector(args.plot_keys) if args.plot else None

    # The daemon's pipeline variables (LSTMD_ENGINE, ...), each flag overriding its
    # variable, so a replay reproduces what `lstmd run` does with the same environment.
    settings = load_pipeline_settings(
        engine=args.engine,
        step_gap=args.step_gap,
        max_record_bytes=args.max_record_bytes,
        max_sequences=args.max_sequences,
    )
    logs.configure("WARNING", "console")  # on stderr: stdout may carry the predictions
    processor = processor_from_settings(settings, Path(args.model), Metrics())
    out = open(args.output, "wb") if args.output else sys.stdout.buffer  # noqa: SIM115
    dead = open(args.dlq, "wb") if args.dlq else sys.stderr.buffer  # noqa: SIM115
    try:
        with open(args.input, "rb") as source:
            predicted, rejected = replay(processor, source, out, dead, collector)
    finally:
        out.flush()
        dead.flush()
    if collector is not None:
        series = collector.series()
        unplotted = [s.key for s in series if not s.steps]
        if unplotted:
            print(f"lstmd replay: no predictions to plot for {', '.join(unplotted)}", file=sys.stderr)
        drawn = panels(series)
        if drawn:
            path = plot.draw(
                drawn,
                Path(args.plot),
                title=f"lstmd replay: {Path(args.input).name}, {processor.engine.name} engine",
                xlabel="input line",
            )
            keys = ", ".join(s.key for s in series if s.steps)
            print(f"lstmd replay: picture of {keys} written to {path}", file=sys.stderr)
    print(
        f"lstmd replay: {predicted} predictions, {rejected} rejected; engine {processor.engine.name}",
        file=sys.stderr,
    )
    return ExitCode.OK


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
        return ExitCode.OK
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
    return ExitCode.OK


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


def _plot_keys(text: str) -> list[str]:
    keys = [key for key in text.split(",") if key]
    if not keys:
        raise argparse.ArgumentTypeError("no key named")
    return keys


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
    r.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw a PNG of inputs' x[0] and predictions' y[0] by input line, per key, "
        "state resets dashed (needs matplotlib: pip install 'lstmd[plot]')",
    )
    r.add_argument(
        "--plot-keys",
        metavar="KEYS",
        type=_plot_keys,
        help="comma-separated keys to draw (default: the input's first four)",
    )
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
        return int(code)  # an ExitCode is an int; SystemExit is given the plain number
    except StartupError as exc:
        print(f"lstmd: {exc}", file=sys.stderr)
        return ExitCode.STARTUP.value
    except KeyboardInterrupt:
        return ExitCode.OK.value
