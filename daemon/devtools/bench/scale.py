"""The `scale` section: events per second of the processor and the fast engine
with many interleaved sequences, no broker.

The demo model's shape, the fast engine, a `Processor` over an unbounded
`StateStore`. N interleaved sequences (event i is sequence i % N's, keys
`s<seq>`, values `{"x": [v]}` like the e2e stream's) are fed as
`daemon.replay.FileRecord`s in poll-sized batches of `scale_batch` records, one
`Processor.process` call each, followed by the checkpoint's
`StateStore.take_changes` (its snapshots are part of a batch's work). First one
untimed event per sequence (every state exists, the engine is warm), then
`scale_rounds` rounds of `scale_events` events each, timed per batch (making
the records is not timed).

Contenders, alternating within each round: N = `scale_baseline_sequences`
(the baseline, 1 k) and N = `scale_sequences` (100 k). A row per N: events/s,
the median and 99th percentile of a batch's process-and-checkpoint time, and
events/s over the baseline's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from daemon.devtools.bench.broker import stream_value
from daemon.devtools.bench.config import E2E_MODEL, MODELS, BenchConfig, Log, Row
from daemon.devtools.bench.files import model_file


class Feed:
    """N interleaved sequences through one processor and store, batch by batch."""

    def __init__(self, model: Any, engine: Any, sequences: int, batch: int) -> None:
        from daemon.core.processor import Processor
        from daemon.core.state import StateStore
        from daemon.ops.metrics import Metrics

        self.sequences = sequences
        self.batch = batch
        self.model_id = str(model.identity)
        self.store = StateStore(0)
        self.processor = Processor(
            engine, model_id=self.model_id, n_features=model.n_features, store=self.store, metrics=Metrics()
        )
        self.keys = [f"s{seq:07d}".encode() for seq in range(sequences)]
        self.values = [stream_value(seq % 97, step) for seq in range(7) for step in range(64)]
        self.offset = 0

    def records(self, n: int) -> list[Any]:
        from daemon.replay import FileRecord

        start = self.offset
        self.offset += n
        keys, values, seqs = self.keys, self.values, self.sequences
        nv = len(values)
        return [
            FileRecord("in", 0, i, 0, keys[i % seqs], values[(i // seqs + i) % nv])
            for i in range(start, start + n)
        ]

    def run(self, events: int) -> list[float]:
        """Feed `events` events; the time of each batch (process + take_changes)."""
        took = []
        for done in range(0, events, self.batch):
            records = self.records(min(self.batch, events - done))
            started = time.perf_counter()
            self.processor.process(records)
            self.store.take_changes(self.model_id)
            took.append(time.perf_counter() - started)
        return took


class ScaleSection:
    """Events per second with many interleaved sequences (see the module docstring)."""

    name = "scale"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        from daemon.inference.engines.factory import make_engine
        from daemon.inference.model import load_model

        spec = MODELS[E2E_MODEL]
        model = load_model(model_file(spec))
        engine, refused = make_engine("fast", model)
        counts = (config.scale_baseline_sequences, config.scale_sequences)
        feeds = {}
        for n in counts:
            log(f"bench: scale x{n:,}: one untimed event per sequence ...")
            feeds[n] = Feed(model, engine, n, config.scale_batch)
            feeds[n].run(n)
        rates: dict[int, list[float]] = {n: [] for n in counts}
        p50: dict[int, list[float]] = {n: [] for n in counts}
        p99: dict[int, list[float]] = {n: [] for n in counts}
        for i in range(config.scale_rounds):
            for n in counts:
                log(
                    f"bench: scale round {i + 1}/{config.scale_rounds} x{n:,} "
                    f"({config.scale_events:,} events) ..."
                )
                took = feeds[n].run(config.scale_events)
                rates[n].append(config.scale_events / sum(took))
                p50[n].append(float(np.percentile(took, 50)))
                p99[n].append(float(np.percentile(took, 99)))
        base = statistics.median(rates[counts[0]])
        rows: list[Row] = []
        for n in counts:
            rate = statistics.median(rates[n])
            rows.append(
                {
                    "section": self.name,
                    "model": spec.name,
                    "engine": engine.name,
                    "requested": "fast",
                    "open_sequences": len(feeds[n].store),
                    "interleaved": n,
                    "events": config.scale_events,
                    "batch": config.scale_batch,
                    "rounds": config.scale_rounds,
                    "events_per_s": rate,
                    "events_per_s_each": rates[n],
                    "batch_p50_ms": statistics.median(p50[n]) * 1e3,
                    "batch_p99_ms": statistics.median(p99[n]) * 1e3,
                    "vs_baseline": rate / base if base else None,
                    "baseline_sequences": counts[0],
                    "note": refused or "",
                }
            )
        return rows
