"""The `keras-overhead` section: what the keras engine costs over the bare
`predict_on_batch` loop it wraps.

For each model of `BenchConfig.models`, on its batch-1 stateful copy
(`ServableModel.stateful`), the same `overhead_events` events (random inputs)
in each of `scale_rounds` rounds, contenders alternating within a round:

* `engine`: `KerasEngine.step`, one call per wave of N events (N interleaved
  sequences; with N > 1 every event swaps its sequence's state in);
* `loop`: the bare loop: one `stateful.predict_on_batch` per event; with N > 1
  it assigns the sequence's state into the state variables before the event
  and reads them back after it, as the engine does (the fair comparison);
* `loop, no swap` (N > 1 only): predict_on_batch alone, the states left in the
  variables (wrong results across sequences: the floor, for reference);
* `loop + read back` (N = 1 only): predict_on_batch and the state read back
  after each event, as the engine does for its resident sequence.

N is 1 and `overhead_sequences`. A row per model, N and contender: events/s
and microseconds per event (medians), and for the engine its overhead over the
fair loop (time per event / the loop's - 1) against the issue's target
(`overhead_target`, 20 %), and two short profiles of one more engine run each
(cProfile): the functions with the most own time, and the cumulative time of
the engine's parts (`BREAKDOWN`), per event.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from daemon.devtools.bench.config import MODELS, BenchConfig, Log, Row
from daemon.devtools.bench.files import model_file

PROFILE_TOP = 8


class _Slot:
    __slots__ = ("tensors",)

    def __init__(self) -> None:
        self.tensors: list[np.ndarray] | None = None


def engine_run(model: Any, engine: Any, xs: np.ndarray) -> Callable[[], float]:
    """xs: (waves, N, features). Returns a run: the seconds of stepping them all."""
    slots = [_Slot() for _ in range(xs.shape[1])]

    def run() -> float:
        engine.invalidate()  # the loops below use the same variables
        started = time.perf_counter()
        for x in xs:
            engine.step(slots, x)
        return time.perf_counter() - started

    return run


def loop_run(model: Any, xs: np.ndarray, swap: bool, read_back: bool = False) -> Callable[[], float]:
    """The bare predict_on_batch loop over the same events, with or without the
    state swap of each event's sequence (`swap`: assign before, read back after),
    or with the read-back alone (`read_back`: what keeps a resident sequence's
    state current)."""
    stateful = model.stateful
    variables = list(model.state_variables)
    shapes = [(1, *s) for s in model.state_shapes]
    n = xs.shape[1]
    states = [[np.zeros(s, dtype=np.float32) for s in shapes] for _ in range(n)]
    events = [x.reshape(1, 1, -1) for wave in xs for x in wave]

    def run() -> float:
        started = time.perf_counter()
        if read_back and not swap:
            for i, x in enumerate(events):
                stateful.predict_on_batch(x)
                states[i % n] = [np.array(var.numpy(), dtype=np.float32) for var in variables]
        elif not swap:
            for x in events:
                stateful.predict_on_batch(x)
        else:
            for i, x in enumerate(events):
                state = states[i % n]
                for var, arr in zip(variables, state, strict=True):
                    var.assign(arr)
                stateful.predict_on_batch(x)
                states[i % n] = [np.array(var.numpy(), dtype=np.float32) for var in variables]
        return time.perf_counter() - started

    return run


def profile(run: Callable[[], float], events: int) -> list[dict[str, Any]]:
    """The functions with the most own time in one run: us per event, share."""
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    stats = pstats.Stats(prof)
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0
    top = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:PROFILE_TOP]
    return [
        {
            "function": f"{func[0].rpartition('site-packages/')[2]}:{func[1]}({func[2]})",
            "us_per_event": own / events * 1e6,
            "share": own / total,
        }
        for func, (_, _, own, _, _) in top
    ]


# Where an engine step's time goes: (label, file suffix, function) whose cumulative
# time per event `breakdown` reports.
BREAKDOWN = (
    ("predict_on_batch", "keras/src/backend/tensorflow/trainer.py", "predict_on_batch"),
    ("state assign (swap)", "daemon/inference/engines/keras.py", "_assign"),
    ("state read-back", "daemon/inference/engines/keras.py", "_read"),
    ("check_batch", "daemon/inference/engines/contract.py", "check_batch"),
    ("flatten_step_outputs", "daemon/inference/servable.py", "flatten_step_outputs"),
    ("KerasEngine.step (all)", "daemon/inference/engines/keras.py", "step"),
)


def breakdown(run: Callable[[], float], events: int) -> list[dict[str, Any]]:
    """Cumulative time per event of the engine's parts (`BREAKDOWN`) in one
    profiled run (cProfile inflates Python calls: compare shares, not totals)."""
    prof = cProfile.Profile()
    prof.enable()
    run()
    prof.disable()
    entries: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    whole = next(
        (v[3] for f, v in entries.items() if f[0].endswith(BREAKDOWN[-1][1]) and f[2] == BREAKDOWN[-1][2]),
        0.0,
    )
    out = []
    for label, suffix, name in BREAKDOWN:
        cum = sum(v[3] for f, v in entries.items() if f[0].endswith(suffix) and f[2] == name)
        out.append(
            {"part": label, "us_per_event": cum / events * 1e6, "share": cum / whole if whole else None}
        )
    return out


class OverheadSection:
    """The keras engine over the bare loop it wraps (see the module docstring)."""

    name = "keras-overhead"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        from daemon.inference.engines.keras import KerasEngine
        from daemon.inference.model import load_model

        rows: list[Row] = []
        for model_name in config.models:
            spec = MODELS[model_name]
            model = load_model(model_file(spec))
            engine = KerasEngine(model)
            rng = np.random.default_rng(config.seed)
            for n in sorted({1, config.overhead_sequences}):
                waves = max(1, config.overhead_events // n)
                xs = rng.random((waves, n, spec.features), dtype=np.float32)
                events = waves * n
                contenders: dict[str, Callable[[], float]] = {
                    "engine": engine_run(model, engine, xs),
                    "loop": loop_run(model, xs, swap=n > 1),
                }
                if n > 1:
                    contenders["loop, no swap"] = loop_run(model, xs, swap=False)
                else:  # the engine reads a resident state back after every event too
                    contenders["loop + read back"] = loop_run(model, xs, swap=False, read_back=True)
                for run in contenders.values():  # warm-up: traced, allocated
                    run()
                times: dict[str, list[float]] = {c: [] for c in contenders}
                for i in range(config.scale_rounds):
                    log(f"bench: keras-overhead {spec.name} x{n} round {i + 1}/{config.scale_rounds} ...")
                    for name, run in contenders.items():
                        times[name].append(run())
                loop_s = statistics.median(times["loop"])
                for name in contenders:
                    seconds = statistics.median(times[name])
                    row: Row = {
                        "section": self.name,
                        "model": spec.name,
                        "engine": name,
                        "requested": name,
                        "interleaved": n,
                        "events": events,
                        "rounds": config.scale_rounds,
                        "events_per_s": events / seconds,
                        "us_per_event": seconds / events * 1e6,
                        "vs_loop": loop_s / seconds,  # throughput over the fair loop's
                        "note": "",
                    }
                    if name == "engine":
                        overhead = seconds / loop_s - 1.0
                        row["overhead"] = overhead
                        row["overhead_each"] = [
                            e / lp - 1.0 for e, lp in zip(times["engine"], times["loop"], strict=True)
                        ]
                        row["target"] = f"at most {config.overhead_target:.0%} over the loop"
                        row["target_met"] = overhead <= config.overhead_target
                        row["profile"] = profile(contenders["engine"], events)
                        row["breakdown"] = breakdown(contenders["engine"], events)
                    rows.append(row)
        return rows
