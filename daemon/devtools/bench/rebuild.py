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
* `rebuild`: `daemon.streaming.rebuild`'s `plan`, `Recompute` over
  `rebuild_processor` (predictions withheld), fed the same batches, then
  `finish` (timed from the plan to the rebuilt states).

* `rebuilder + Kafka` (fast engine only): the daemon's own `Rebuilder`, with the
  reader the daemon gives it (the port's `reader()` of LSTMD_KAFKA_CLIENT: no group,
  read_committed), over `rebuild_broker_sequences` x `rebuild_steps` records
  produced once to one partition of a topic on the run's broker (broker.py):
  `begin` and `step()` until the partition is rebuilt, timed (making the
  consumer is not; its first connection is). Its ratio is to the fast live row.

The keras engine steps one sequence per model call: it is measured on
`rebuild_keras_sequences` x `rebuild_keras_steps`, and any size other than the
target's has its time for the target extrapolated from its rate (the row says
so). A row per engine and contender: events/s, seconds for the target (measured
or extrapolated), the ratio to the live row of the same engine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

from daemon.devtools.bench.broker import BROKER, create_topics_for_bench, stream_value, unique
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


def _processor(model: Any, engine: Any) -> Any:
    """A live processor of the model over an empty store (what each contender starts from)."""
    from daemon.core.processor import Processor
    from daemon.core.state import StateStore
    from daemon.ops.metrics import Metrics

    return Processor(
        engine,
        model_id=str(model.identity),
        n_features=model.n_features,
        store=StateStore(0),
        metrics=Metrics(),
    )


def _live(model: Any, engine: Any, sequences: int, steps: int) -> float:
    proc = _processor(model, engine)
    took = 0.0
    for batch in batches(sequences, steps):
        started = time.perf_counter()
        proc.process(batch)
        took += time.perf_counter() - started
    return took


def _rebuild(model: Any, engine: Any, sequences: int, steps: int) -> tuple[float, int]:
    from daemon.core.state import SavedState
    from daemon.streaming.rebuild import Recompute, plan, rebuild_processor

    live = _processor(model, engine)
    saved = saved_states(sequences, steps)
    restored = {k: SavedState(s, "old@0") for k, s in saved.items()}
    took = 0.0
    started = time.perf_counter()
    recompute = Recompute(plan(0, saved, 0, sequences * steps), saved, rebuild_processor(live))
    took += time.perf_counter() - started
    for batch in batches(sequences, steps):
        started = time.perf_counter()
        recompute.feed(batch)
        took += time.perf_counter() - started
    started = time.perf_counter()
    done = recompute.finish(restored)
    took += time.perf_counter() - started
    assert done.replayed == sequences * steps and done.rebuilt == sequences, (done.replayed, done.rebuilt)
    return took, done.rebuilt


def _settings(bootstrap: str, topic: str, model_path: Any) -> Any:
    from daemon.config import Settings

    return Settings(
        kafka_bootstrap_servers=bootstrap,
        input_topic=topic,
        output_topic=f"{topic}.out",
        group_id=f"{topic}.group",
        model_path=model_path,
        log_level="WARNING",
    )


def _produce(bootstrap: str, topic: str, sequences: int, steps: int) -> None:
    """The interleaved partition, in order to partition 0 (offset i = record i)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,  # offsets in the order sent
        linger_ms=20,
        batch_size=512 << 10,
    )
    try:
        for batch in batches(sequences, steps):
            for rec in batch:
                producer.send(topic, key=rec.key, value=rec.value, partition=0)
        producer.flush(timeout=300)
    finally:
        producer.close(timeout=30)


def _rebuilder(settings: Any, model: Any, engine: Any, sequences: int, steps: int) -> float:
    """Seconds of the daemon's Rebuilder over the topic: begin + step() until rebuilt."""
    from daemon.core.state import SavedState
    from daemon.kafka.backends import make_backend
    from daemon.ops.metrics import Metrics
    from daemon.streaming.rebuild import Rebuilder

    live = _processor(model, engine)
    consumer = make_backend(settings).reader()
    try:
        rebuilder = Rebuilder(lambda: consumer, settings, Metrics(), live)
        restored = {k: SavedState(s, "old@0") for k, s in saved_states(sequences, steps).items()}
        started = time.perf_counter()
        rebuilder.begin(0, restored)
        done: list[Any] = []
        while not done:
            done = rebuilder.step()
        took = time.perf_counter() - started
        if done[0].replayed != sequences * steps or done[0].rebuilt != sequences:
            raise RuntimeError(f"rebuilt {done[0].rebuilt} of {sequences}, replayed {done[0].replayed}")
        return took
    finally:
        consumer.close(5000)


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
            sizes = dict.fromkeys(rates, (seqs, steps))
            for i in range(config.scale_rounds):
                log(
                    f"bench: rebuild {engine.name} round {i + 1}/{config.scale_rounds}: "
                    f"{seqs:,} x {steps} = {events:,} events, live then rebuild ..."
                )
                rates["live"].append(events / _live(model, engine, seqs, steps))
                took, _ = _rebuild(model, engine, seqs, steps)
                rates["rebuild"].append(events / took)
            if requested == "fast" and config.rebuild_broker_sequences:
                seqs, steps = config.rebuild_broker_sequences, config.rebuild_steps
                sizes["rebuilder + Kafka"] = (seqs, steps)
                bootstrap = BROKER.bootstrap(config, log)
                topic = unique("bench-rebuild-in")
                create_topics_for_bench(bootstrap, {topic: 1})
                log(f"bench: rebuild: producing {seqs * steps:,} records to {topic} ...")
                _produce(bootstrap, topic, seqs, steps)
                settings = _settings(bootstrap, topic, model_file(spec))
                rates["rebuilder + Kafka"] = []
                for i in range(config.scale_rounds):
                    log(f"bench: rebuild round {i + 1}/{config.scale_rounds}: Rebuilder over {topic} ...")
                    rates["rebuilder + Kafka"].append(
                        seqs * steps / _rebuilder(settings, model, engine, seqs, steps)
                    )
            base = statistics.median(rates["live"])
            for contender in rates:
                seqs, steps = sizes[contender]
                events = seqs * steps
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
