"""The `rebuild` section: how fast a model change rebuilds open sequences, no broker.

The demo model's shape. `rebuild_sequences` open sequences of `rebuild_steps`
steps each (issue 13: 10 k x 100 = 1 M events), interleaved (offset i is
sequence i % N's step i // N, keys `s<seq>`, values `{"x": [v]}` like the e2e
stream's), as `daemon.replay.FileRecord`s of one partition, made batch by batch
(5000 records, the rebuilder's largest poll; making them is not timed). Their
saved states are those of another model (`old@0`), each spanning its whole
sequence, so the plan reads every record and replays every one.

Contenders, per engine of `BenchConfig.engines`, in each of `scale_rounds` rounds:

* `live` (the baseline): a publishing `Processor` over a fresh store, fed the
  same batches: what serving these inputs cost the first time;
* `rebuild`: `daemon.streaming.rebuild`'s `plan`, `Replay` over
  `replay_processor` (predictions withheld), fed the same batches, then
  `finish` (timed from the plan to the rebuilt states).

The keras engine steps one sequence per model call: it is measured on
`rebuild_keras_sequences` x `rebuild_keras_steps` and its time for the full
size extrapolated from its rate (the row says so). A row per engine and
contender: events/s, seconds (for the full size: measured or extrapolated), the
ratio to the live row of the same engine. Reading the input partition from
Kafka comes on top: kafka-python reads 30 to 100 k records/s (see the restore
section for the same consumer on the state topic).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

from daemon.devtools.bench.broker import stream_value
from daemon.devtools.bench.config import E2E_MODEL, MODELS, BenchConfig, Log, Row
from daemon.devtools.bench.files import model_file

BATCH = 5000  # records per feed: the rebuilder's largest poll (rebuild.MAX_POLL_RECORDS)


def batches(sequences: int, steps: int) -> Iterator[list[Any]]:
    """The interleaved input partition, BATCH records at a time."""
    from daemon.replay import FileRecord

    keys = [f"s{seq:07d}".encode() for seq in range(sequences)]
    values = [stream_value(seq % 97, step) for seq in range(7) for step in range(64)]
    total, nv = sequences * steps, len(values)
    for start in range(0, total, BATCH):
        yield [
            FileRecord("in", 0, i, 0, keys[i % sequences], values[(i // sequences + i) % nv])
            for i in range(start, min(total, start + BATCH))
        ]


def saved_states(sequences: int, steps: int) -> dict[str, Any]:
    """Open states of another model, each spanning its whole sequence."""
    from daemon.core.state import SequenceState

    return {
        f"s{seq:07d}": SequenceState(
            n=steps, first_offset=seq, watermark=(steps - 1) * sequences + seq, last_step=None
        )
        for seq in range(sequences)
    }


def _live(model: Any, engine: Any, sequences: int, steps: int) -> float:
    from daemon.core.processor import Processor
    from daemon.core.state import StateStore
    from daemon.ops.metrics import Metrics

    store = StateStore(0)
    proc = Processor(
        engine, model_id=str(model.identity), n_features=model.n_features, store=store, metrics=Metrics()
    )
    took = 0.0
    for batch in batches(sequences, steps):
        started = time.perf_counter()
        proc.process(batch)
        took += time.perf_counter() - started
    return took


def _rebuild(model: Any, engine: Any, sequences: int, steps: int) -> tuple[float, int]:
    from daemon.core.processor import Processor
    from daemon.core.state import StateStore
    from daemon.ops.metrics import Metrics
    from daemon.streaming.rebuild import Replay, plan, replay_processor

    live = Processor(
        engine,
        model_id=str(model.identity),
        n_features=model.n_features,
        store=StateStore(0),
        metrics=Metrics(),
    )
    saved = saved_states(sequences, steps)
    restored = {k: (s, "old@0") for k, s in saved.items()}
    took = 0.0
    started = time.perf_counter()
    replay = Replay(plan(0, saved, 0, sequences * steps), saved, replay_processor(live))
    took += time.perf_counter() - started
    for batch in batches(sequences, steps):
        started = time.perf_counter()
        replay.feed(batch)
        took += time.perf_counter() - started
    started = time.perf_counter()
    done = replay.finish(restored)
    took += time.perf_counter() - started
    assert done.replayed == sequences * steps and done.rebuilt == sequences, (done.replayed, done.rebuilt)
    return took, done.rebuilt


class RebuildSection:
    """Rebuild throughput and the time to rebuild 10 k x 100 (see the module docstring)."""

    name = "rebuild"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        from daemon.inference.engines.factory import make_engine
        from daemon.inference.model import load_model

        spec = MODELS[E2E_MODEL]
        model = load_model(model_file(spec))
        target = config.rebuild_sequences * config.rebuild_steps
        rows: list[Row] = []
        for requested in config.engines:
            engine, refused = make_engine(requested, model)
            if requested == "keras":
                seqs, steps = config.rebuild_keras_sequences, config.rebuild_keras_steps
            else:
                seqs, steps = config.rebuild_sequences, config.rebuild_steps
            events = seqs * steps
            rates: dict[str, list[float]] = {"live": [], "rebuild": []}
            for i in range(config.scale_rounds):
                log(
                    f"bench: rebuild {engine.name} round {i + 1}/{config.scale_rounds}: "
                    f"{seqs:,} x {steps} = {events:,} events, live then rebuild ..."
                )
                rates["live"].append(events / _live(model, engine, seqs, steps))
                took, _ = _rebuild(model, engine, seqs, steps)
                rates["rebuild"].append(events / took)
            base = statistics.median(rates["live"])
            for contender in ("live", "rebuild"):
                rate = statistics.median(rates[contender])
                rows.append(
                    {
                        "section": self.name,
                        "model": spec.name,
                        "engine": engine.name,
                        "requested": requested,
                        "contender": contender,
                        "open_sequences": seqs,
                        "steps": steps,
                        "events": events,
                        "rounds": config.scale_rounds,
                        "events_per_s": rate,
                        "events_per_s_each": rates[contender],
                        "target_events": target,
                        "target_seconds": target / rate,
                        "extrapolated": events != target,
                        "vs_live": rate / base if base else None,
                        "note": refused or "",
                    }
                )
        return rows
