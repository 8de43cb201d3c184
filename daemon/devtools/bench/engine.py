"""The `engine` section: the engines alone, no decoding, no Kafka.

For each model of `MODELS`, each engine (keras, fast) and each sequence count N,
N interleaved sequences are stepped together, one `engine.step` call per wave of
N events (the processor's waves: the k-th pending event of every sequence), for
several rounds (see `BenchConfig`). Per round: events/s (events over the time
spent in `step`), and the median and 99th percentile of the latency per event,
an event's latency being the duration of the step that computed it (in a
batched step every event waits for the whole wave). The report gives, per
figure, the median over the rounds.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.devtools.bench.config import MODELS, BenchConfig, Log, Row
from daemon.devtools.bench.files import model_file


@dataclass(eq=False)
class _Slot:
    tensors: list[np.ndarray] | None = None


def measure(
    engine: Any,
    n_features: int,
    sequences: int,
    events: int,
    rounds: int,
    seed: int,
    min_seconds: float,
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
        from daemon.inference.engines.factory import make_engine
        from daemon.inference.model import load_model

        rows: list[Row] = []
        for model_name in config.models:
            spec = MODELS[model_name]
            model = load_model(model_file(spec))
            for requested in config.engines:
                engine, refused = make_engine(requested, model)
                budget = config.keras_events if engine.name == "keras" else config.events
                for n in config.sequences:
                    log(f"bench: {self.name} {spec.name} {engine.name} x{n} ...")
                    row = measure(
                        engine, spec.features, n, budget, config.rounds, config.seed, config.min_round_s
                    )
                    rows.append(
                        {
                            "section": self.name,
                            "model": spec.name,
                            "engine": engine.name,
                            "requested": requested,
                            **row,
                            "note": refused or "",
                        }
                    )
        return rows
