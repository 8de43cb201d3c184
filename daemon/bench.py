"""`lstmd bench`: throughput and latency of lstmd's engines.

A run is a list of sections, each returning rows (plain dicts, see `Row`); the
report adds each row's throughput ratio to the keras row of the same section,
model and sequence count, prints a table or JSON. Today there is one section:

* `engine`: the engines alone, no decoding, no Kafka. For each model of
  `MODELS`, each engine (keras, fast) and each sequence count N, N interleaved
  sequences are stepped together, one `engine.step` call per wave of N events
  (the processor's waves: the k-th pending event of every sequence), for
  several rounds (see `BenchConfig`). Per round: events/s (events over the time spent in `step`),
  and the median and 99th percentile of the latency per event, an event's
  latency being the duration of the step that computed it (in a batched step
  every event waits for the whole wave). The report gives, per figure, the
  median over the rounds.

Adding a section (e.g. an end-to-end one through the local Kafka broker with
keras, fast and a pass-through engine): write a class with a `name` and a
`run(config, log) -> list[Row]` method and add it to `SECTIONS`; its rows use the
same keys, `engine` naming what was measured.

Speeds are never asserted anywhere: the machine is shared. Compare ratios from
one run, not absolute figures from different runs.
"""

from __future__ import annotations

import atexit
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Row = dict[str, Any]
"""One measured configuration. Keys: section, model, engine (what was measured),
requested (the engine asked for; differs when the fast engine was refused),
sequences, events (per round, median), rounds, events_per_s, latency_p50_ms,
latency_p99_ms (medians over the rounds), note (why the engine was refused, or
empty); the report adds vs_keras (events_per_s over the keras row's)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: Input(features) -> LSTM(units) -> Dense(1, activation)."""

    name: str
    features: int
    units: int
    activation: str
    description: str


MODELS: dict[str, ModelSpec] = {
    "demo": ModelSpec("demo", 1, 32, "sigmoid", "LSTM(32) + Dense(1, sigmoid), 1 feature (the demo's)"),
    "lstm64x16": ModelSpec("lstm64x16", 16, 64, "linear", "LSTM(64) + Dense(1), 16 features"),
}


@dataclass(frozen=True)
class BenchConfig:
    """What to run. A round of one configuration steps whole waves of N events
    until it has stepped at least `events` events (fast engine; `keras_events`
    for the keras engine) and spent at least `min_round_s` seconds in `step`
    (so that a preemption on a shared machine does not make a round): the
    figure is the throughput, not the count."""

    sections: tuple[str, ...] = ("engine",)
    models: tuple[str, ...] = ("demo", "lstm64x16")
    engines: tuple[str, ...] = ("keras", "fast")
    sequences: tuple[int, ...] = (1, 64, 1000)
    rounds: int = 5
    events: int = 10_000
    keras_events: int = 600
    min_round_s: float = 0.25
    seed: int = 0


class Section(Protocol):
    name: str

    def run(self, config: BenchConfig, log: Log) -> list[Row]: ...


@dataclass(eq=False)
class _Slot:
    tensors: list[np.ndarray] | None = None


@cache
def model_file(spec: ModelSpec) -> Path:
    """The spec's model, seeded and saved once per process in a temporary
    directory removed at exit."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(1234)
    model = keras.Sequential([
        keras.Input(shape=(None, spec.features)),
        keras.layers.LSTM(spec.units),
        keras.layers.Dense(1, activation=spec.activation),
    ])
    rng = np.random.default_rng(1234)
    model.set_weights([w + rng.normal(0.0, 0.1, size=w.shape).astype(w.dtype) for w in model.get_weights()])
    path = _work_dir() / f"{spec.name}.keras"
    model.save(path)
    return path


@cache
def _work_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="lstmd-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def measure(
    engine: Any, n_features: int, sequences: int, events: int, rounds: int, seed: int, min_seconds: float,
) -> Row:
    """Step `sequences` interleaved sequences in waves of `sequences` events, in
    `rounds` rounds of at least `events` events and `min_seconds` of stepping;
    the medians over the rounds."""
    min_waves = max(1, math.ceil(events / sequences))
    rng = np.random.default_rng(seed)
    slots = [_Slot() for _ in range(sequences)]
    xs = rng.random((min(min_waves, 64), sequences, n_features), dtype=np.float32)  # reused cyclically
    engine.step(slots[: min(sequences, 8)], xs[0, : min(sequences, 8)])  # warm-up
    counts, throughput, p50, p99 = [], [], [], []
    for _ in range(rounds):
        durations: list[float] = []
        spent = 0.0
        while len(durations) < min_waves or spent < min_seconds:
            x = xs[len(durations) % len(xs)]
            started = time.perf_counter()
            engine.step(slots, x)
            took = time.perf_counter() - started
            durations.append(took)
            spent += took
        counts.append(len(durations) * sequences)
        throughput.append(len(durations) * sequences / spent)
        # Every event of a wave has that wave's latency, and waves have equal sizes.
        p50.append(float(np.percentile(durations, 50)))
        p99.append(float(np.percentile(durations, 99)))
    return {
        "sequences": sequences,
        "events": int(statistics.median(counts)),
        "rounds": rounds,
        "events_per_s": statistics.median(throughput),
        "latency_p50_ms": statistics.median(p50) * 1e3,
        "latency_p99_ms": statistics.median(p99) * 1e3,
    }


class EngineSection:
    """The engines alone (see the module docstring)."""

    name = "engine"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        from daemon.engines import make_engine
        from daemon.model import load_model

        rows: list[Row] = []
        for model_name in config.models:
            spec = MODELS[model_name]
            model = load_model(model_file(spec))
            for requested in config.engines:
                engine, refused = make_engine(requested, model)
                budget = config.keras_events if engine.name == "keras" else config.events
                for n in config.sequences:
                    log(f"bench: {self.name} {spec.name} {engine.name} x{n} ...")
                    row = measure(engine, spec.features, n, budget, config.rounds, config.seed,
                                  config.min_round_s)
                    rows.append({
                        "section": self.name,
                        "model": spec.name,
                        "engine": engine.name,
                        "requested": requested,
                        **row,
                        "note": refused or "",
                    })
        return rows


SECTIONS: dict[str, Section] = {"engine": EngineSection()}


ENGINES = ("keras", "fast")


def check(config: BenchConfig) -> None:
    """ValueError naming what the configuration asks for that does not exist."""
    for what, asked, known in (
        ("sections", config.sections, tuple(SECTIONS)),
        ("models", config.models, tuple(MODELS)),
        ("engines", config.engines, ENGINES),
    ):
        unknown = [a for a in asked if a not in known]
        if unknown or not asked:
            raise ValueError(
                f"unknown or no {what}: {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
    if not config.sequences or min(config.sequences) < 1:
        raise ValueError("sequence counts must be positive")


def run(config: BenchConfig, log: Log | None = None) -> dict[str, Any]:
    """Run the configured sections; the report: meta, rows (with vs_keras)."""
    check(config)
    say: Log = log or (lambda _msg: None)
    started = time.time()
    rows: list[Row] = []
    for name in config.sections:
        rows.extend(SECTIONS[name].run(config, say))
    add_ratios(rows)
    return {"meta": _meta(config, time.time() - started), "rows": rows}


def add_ratios(rows: list[Row]) -> None:
    """Set each row's vs_keras: its events/s over the keras row's of the same
    section, model and sequences (None without such a row)."""
    keras_rows = {
        (r["section"], r["model"], r["sequences"]): r["events_per_s"]
        for r in rows if r["engine"] == "keras" and r["requested"] == "keras"
    }
    for r in rows:
        base = keras_rows.get((r["section"], r["model"], r["sequences"]))
        r["vs_keras"] = r["events_per_s"] / base if base else None


def _meta(config: BenchConfig, seconds: float) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "config": asdict(config),
        "models": {name: MODELS[name].description for name in config.models},
        "seconds": round(seconds, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
    }
    try:
        import keras
        import tensorflow as tf

        meta["tensorflow"] = tf.__version__
        meta["keras"] = keras.__version__
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    return meta


def format_table(report: dict[str, Any]) -> str:
    """The rows as an aligned text table, the engines of one configuration together."""
    header = ("section", "model", "seqs", "engine", "events/s", "p50 ms", "p99 ms", "vs keras", "events")
    lines: list[Sequence[str]] = [header]
    rows = report["rows"]
    first: dict[Any, int] = {}
    for i, r in enumerate(rows):
        first.setdefault((r["section"],), i)
        first.setdefault((r["section"], r["model"]), i)
    # Engines side by side: grouped by section, model and sequences, in run order.
    ordered = sorted(rows, key=lambda r: (
        first[(r["section"],)], first[(r["section"], r["model"])], r["sequences"]))
    for r in ordered:
        engine = r["engine"] if r["engine"] == r["requested"] else f"{r['engine']} (asked {r['requested']})"
        ratio = r.get("vs_keras")
        lines.append((
            r["section"], r["model"], str(r["sequences"]), engine,
            f"{r['events_per_s']:,.0f}", f"{r['latency_p50_ms']:.3f}", f"{r['latency_p99_ms']:.3f}",
            f"{ratio:.1f}x" if ratio is not None else "-", str(r["events"]),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {2, 4, 5, 6, 7, 8}
    out = []
    for line in lines:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    meta = report["meta"]
    cfg = meta["config"]
    out.append("")
    out.append(
        f"medians of {cfg['rounds']} rounds; events = per round and configuration; latency per event = "
        "duration of the step (wave) that computed it; vs keras = events/s over keras's"
    )
    for name, description in meta["models"].items():
        out.append(f"{name}: {description}")
    notes = {r["note"] for r in report["rows"] if r.get("note")}
    out.extend(f"note: {note}" for note in sorted(notes))
    out.append(f"{meta['cpus']} CPUs, load average {meta['load_average']}, {meta['seconds']} s")
    return "\n".join(out)


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_ints(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in parse_list(text))
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values
