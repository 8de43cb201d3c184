"""The `shadow` section: what a second model beside the serving one costs (a shadow,
LSTMD_SHADOW_MODEL_PATH, or a candidate being promoted), no broker.

The demo model's shape, serving and shadow alike (a shadow of another shape costs
its own model's step instead). `shadow_sequences` interleaved sequences of
`shadow_steps` steps (the rebuild section's records, daemon.replay.FileRecord),
fed batch by batch, per engine of `BenchConfig.engines`, in each of `shadow_rounds`
rounds to two contenders over fresh stores:

* `serving` (the baseline): the run loop's processing of a batch, `Processor.process`;
* `serving + shadow`: the same, then the shadow's (`Followers.process`: the follower
  steps the batch with its own store, its outputs re-kinded for the shadow topic,
  each prediction compared with the serving one's).

A row per engine and contender: the CPU microseconds per event (this process's CPU
time, median of the rounds) and the ratio to `serving`; and for the shadow, the
bytes of its states after the run and the resident memory its model added when it
was loaded (VmRSS before and after). Its build (replaying open sequences) costs what a
rebuild does: the `rebuild` section.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from daemon.devtools.bench.config import E2E_MODEL, MODELS, BenchConfig, Log, Row, aligned
from daemon.devtools.bench.files import model_file
from daemon.devtools.bench.rebuild import batches


def rss_bytes() -> int:
    """This process's resident memory (Linux), 0 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _serving(model_path: Path, engine: str, shadow: bool) -> tuple[Any, Any, int]:
    """The serving processor, the followers (with a shadow, following partition 0, or
    none) and the memory the shadow's model added."""
    from daemon.config import Settings
    from daemon.ops.metrics import Metrics
    from daemon.pipeline import build_processor
    from daemon.streaming.follow import Follower, Followers, Phase, Role

    metrics = Metrics()
    serving = build_processor(model_path, engine, metrics)
    followers = Followers(metrics, 1e-3)
    added = 0
    if shadow:
        before = rss_bytes()
        processor = build_processor(model_path, engine, Metrics.discarding())
        added = rss_bytes() - before
        settings = Settings(
            kafka_bootstrap_servers="localhost:9092",
            input_topic="in",
            output_topic="out",
            group_id="bench",
            model_path=model_path,
        )
        follower = Follower(processor, Role.SHADOW, settings, metrics, lambda p: None)
        follower.phases[0] = Phase.FOLLOWING  # built: the live cost only
        followers.add(follower)
        serving.ys = {}
    return serving, followers, added


def _round(model_path: Path, engine: str, shadow: bool, sequences: int, steps: int) -> tuple[float, int, int]:
    """CPU seconds of the contender over the batches; the shadow's state bytes and model RSS."""
    serving, followers, added = _serving(model_path, engine, shadow)
    took = 0.0
    for batch in batches(sequences, steps):
        started = time.process_time()
        serving.process(batch)
        if followers:
            followers.process(serving, batch)
        took += time.process_time() - started
    state = followers.all[0].processor.store.state_bytes() if followers else 0
    return took, state, added


class ShadowSection:
    """The cost of a second model per event and in memory (module docstring)."""

    name = "shadow"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        spec = MODELS[E2E_MODEL]
        path = model_file(spec)
        rows: list[Row] = []
        for engine in config.engines:
            seqs = config.shadow_sequences if engine == "fast" else config.shadow_keras_sequences
            steps = config.shadow_steps
            events = seqs * steps
            # Warm-up (first calls, tracing); the shadow's model loaded as the second
            # model of the process here: what it adds (later rounds reuse freed memory).
            _, _, added = _round(path, engine, True, min(seqs, 10), 2)
            cpu: dict[str, list[float]] = {"serving": [], "serving + shadow": []}
            state = 0
            for i in range(config.shadow_rounds):
                log(f"bench: shadow {engine} round {i + 1}/{config.shadow_rounds}: {seqs:,} x {steps} ...")
                cpu["serving"].append(_round(path, engine, False, seqs, steps)[0] / events)
                took, state, _ = _round(path, engine, True, seqs, steps)
                cpu["serving + shadow"].append(took / events)
            base = statistics.median(cpu["serving"])
            for contender, each in cpu.items():
                per_event = statistics.median(each)
                rows.append(
                    {
                        "section": self.name,
                        "model": spec.name,
                        "engine": engine,
                        "requested": engine,
                        "contender": contender,
                        "open_sequences": seqs,
                        "events": events,
                        "rounds": config.shadow_rounds,
                        "cpu_us_per_event": per_event * 1e6,
                        "cpu_us_each": [c * 1e6 for c in each],
                        "vs_serving": per_event / base if base else None,
                        "shadow_state_bytes": state if contender != "serving" else 0,
                        "shadow_model_rss_bytes": added if contender != "serving" else 0,
                        "note": "",
                    }
                )
        return rows


def format_shadow(rows: list[Row]) -> list[str]:
    """The section's lines of the text table (none if it did not run)."""
    rows = [r for r in rows if r["section"] == "shadow"]
    if not rows:
        return []
    lines: list[tuple[str, ...]] = [
        ("engine", "contender", "sequences", "CPU us/ev", "vs serving", "shadow states", "shadow model RSS")
    ]
    for r in rows:
        lines.append(
            (
                r["engine"],
                r["contender"],
                f"{r['open_sequences']:,}",
                f"{r['cpu_us_per_event']:.1f}",
                f"{r['vs_serving']:.2f}",
                f"{r['shadow_state_bytes'] / 2**20:.1f} MiB" if r["shadow_state_bytes"] else "",
                f"{r['shadow_model_rss_bytes'] / 2**20:.1f} MiB" if r["shadow_model_rss_bytes"] else "",
            )
        )
    first = rows[0]
    sizes = ", ".join(sorted({f"{r['engine']} {r['events']:,}" for r in rows}))
    return [
        "",
        *aligned(lines),
        f"shadow: the {first['model']} model serving and shadowing, events per round: {sizes}; CPU time of "
        f"Processor.process and Followers.process, medians of {first['rounds']} rounds; the shadow model's "
        "RSS: what loading it as the process's second model added",
    ]
