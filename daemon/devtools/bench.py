"""`lstmd bench`: throughput and latency of lstmd's engines, alone and end to end.

A run is a list of sections, each returning rows (plain dicts, see `Row`); the
report adds each row's throughput ratio to the keras row of the same section,
model and sequence count (and, end to end, to the pass-through and the peer),
prints a table or JSON. Sections:

* `engine`: the engines alone, no decoding, no Kafka. For each model of
  `MODELS`, each engine (keras, fast) and each sequence count N, N interleaved
  sequences are stepped together, one `engine.step` call per wave of N events
  (the processor's waves: the k-th pending event of every sequence), for
  several rounds (see `BenchConfig`). Per round: events/s (events over the time spent in `step`),
  and the median and 99th percentile of the latency per event, an event's
  latency being the duration of the step that computed it (in a batched step
  every event waits for the whole wave). The report gives, per figure, the
  median over the rounds.
* `e2e`: events per second through a real Kafka broker (the project's
  LocalKafka, started for the run unless `BenchConfig.bootstrap` names one).
  `e2e_events` events of `e2e_sequences` interleaved sequences of the demo
  model's shape (`{"x": [v]}`) are produced once to an input topic of
  `e2e_partitions` partitions; then, in each round, in turn:
  `passthrough`, a kafka-python consume-produce loop with no model and the
  daemon's own client settings (kafka_io.make_consumer / make_producer):
  poll, one send per input, flush, commit per poll batch; and lstmd's real
  run loop (daemon.streaming.loop.RunLoop, in-process, in a thread, at-least-once,
  state topic included) with each engine. Every contender reads the whole
  input topic from the start under a fresh consumer group and writes to its
  own output topic. Timing: from the end of the first poll batch's
  checkpoint (its outputs acknowledged, offsets committed: the first outputs
  have appeared) to the end of the last one's; events = the inputs of the
  batches in between (so group join, restore, model start-up and TensorFlow
  are outside). keras stops after `e2e_keras_events`. The latency columns are
  the median and 99th percentile of a poll-process-checkpoint cycle. Each row
  also carries `broker_events_per_s`: the same run measured from the broker's
  append times of the output records (output topics are LogAppendTime):
  outputs appended after the first one's millisecond over the span from
  the first to the last; it agrees with events/s within about one poll batch
  and is how the peer is measured.
* `peer` (not in the default run; `--peer`): the same job as a Quix Streams
  application (confluent-kafka underneath): a per-key NumPy LSTM step of the
  same weights, the state (h, c, n) in Quix's state store (RocksDB plus its
  changelog topic), reading the same input topic, writing one prediction per
  event to its own output topic, on the same broker. It runs as a subprocess
  of an interpreter that has quixstreams: this venv's if it has it, else a
  venv made once in ~/.cache/lstmd (not this one: quixstreams pins pydantic
  below the daemon's). Measured from the broker's append times (above),
  stopped by SIGTERM once all outputs are in. Skipped, with the reason, when
  quixstreams cannot be installed.
* `profile` (not in the default run): one fast e2e round with a sampling
  profiler on the run loop's thread (every `profile_interval_s`): the wall
  time per event by phase (poll and fetch in kafka-python, codec.decode,
  processor bookkeeping, engine step, encode_prediction, prometheus metrics,
  producer.send of outputs and of state records, flush and acks, commit,
  state snapshots), in microseconds per event.

Speeds are never asserted anywhere: the machine is shared. Compare ratios from
one run, not absolute figures from different runs.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import linecache
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import orjson

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

    sections: tuple[str, ...] = ("engine", "e2e")
    models: tuple[str, ...] = ("demo", "lstm64x16")
    engines: tuple[str, ...] = ("keras", "fast")
    sequences: tuple[int, ...] = (1, 64, 1000)
    rounds: int = 5
    events: int = 10_000
    keras_events: int = 600
    min_round_s: float = 0.25
    seed: int = 0
    # End to end (sections e2e, peer, profile): the demo model's shape, through Kafka.
    e2e_events: int = 20_000  # produced once; passthrough, fast and the peer read them all
    e2e_keras_events: int = 2_000  # keras stops after (at least) these
    e2e_sequences: int = 1000
    e2e_partitions: int = 4
    e2e_rounds: int = 3
    e2e_timeout_s: float = 180.0  # per contender and round
    e2e_max_poll_records: int = 500  # LSTMD_KAFKA_MAX_POLL_RECORDS (the daemon's default)
    bootstrap: str | None = None  # a running broker; None: a LocalKafka for the run
    peer_python: str | None = None  # an interpreter with quixstreams; None: found or made
    profile_interval_s: float = 0.001


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


# ----------------------------------------------------------------------------- end to end

E2E_MODEL = "demo"
# Output topics stamp records with the broker's append time: the peer, which runs
# in another process, is timed from them, and every other contender is cross-checked.
OUTPUT_TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}


@dataclass
class _Round:
    """One contender's round: checkpoint marks (perf_counter at the end of each poll
    batch's checkpoint, inputs in the batch), what went wrong, the broker's view."""

    marks: list[tuple[float, int]]
    error: str = ""
    broker_events_per_s: float | None = None
    outputs: int = 0
    topic: str = ""  # where the outputs went

    def window(self) -> tuple[int, float] | None:
        """Inputs of batches 2..K and the time from the end of batch 1 to the end of batch K."""
        if len(self.marks) < 2:
            return None
        events = sum(n for _, n in self.marks[1:])
        return events, self.marks[-1][0] - self.marks[0][0]

    def cycles(self) -> list[float]:
        return [b - a for (a, _), (b, _) in itertools.pairwise(self.marks)]


class _Broker:
    """The run's broker: the configured one, or a LocalKafka started on first use
    and stopped by `close` (`run` calls it) or at exit."""

    def __init__(self) -> None:
        self.local: Any = None
        self.inputs: dict[tuple[str, int, int, int, int], str] = {}
        self.fast_outputs: str | None = None  # a complete fast e2e round's output topic

    def bootstrap(self, config: BenchConfig, log: Log) -> str:
        if config.bootstrap:
            return config.bootstrap
        if self.local is None:
            from daemon.devtools.localkafka import LocalKafka

            log("bench: starting a local Kafka broker ...")
            self.local = LocalKafka().start()
            atexit.register(self.close)
        return str(self.local.bootstrap)

    def close(self) -> None:
        if self.local is not None:
            local, self.local = self.local, None
            self.inputs = {k: v for k, v in self.inputs.items() if k[0] != local.bootstrap}
            self.fast_outputs = None
            local.stop()
            local.cleanup()

    def input_topic(self, config: BenchConfig, log: Log) -> tuple[str, str]:
        """(bootstrap, topic) of the run's input stream, produced once per broker and shape."""
        bootstrap = self.bootstrap(config, log)
        key = (bootstrap, config.e2e_events, config.e2e_sequences, config.e2e_partitions, config.seed)
        if key not in self.inputs:
            topic = _unique("bench-in")
            create_topics_for_bench(bootstrap, {topic: config.e2e_partitions})
            log(f"bench: producing {config.e2e_events:,} events of {config.e2e_sequences} sequences "
                f"to {topic} ({config.e2e_partitions} partitions) ...")
            produce_stream(bootstrap, topic, config.e2e_events, config.e2e_sequences, config.seed)
            self.inputs[key] = topic
        return bootstrap, self.inputs[key]


BROKER = _Broker()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics_for_bench(bootstrap: str, topics: dict[str, int],
                            config: dict[str, str] | None = None) -> None:
    from daemon.devtools.localkafka import create_topics

    create_topics(bootstrap, topics, config)


def stream_value(seq: int, step: int) -> bytes:
    """The demo's record shape: one feature, a smooth per-sequence signal in [0, 1]."""
    v = 0.5 + 0.4 * math.sin(0.26 * step + 0.7 * seq)
    return orjson.dumps({"x": [round(v, 5)]})


def produce_stream(bootstrap: str, topic: str, events: int, sequences: int, seed: int) -> None:
    """`events` events, sequence i % sequences at its step i // sequences, keyed
    `s<seq>` (partitioned by key, like any producer), acknowledged."""
    from kafka import KafkaProducer

    offset = seed * 7919
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, enable_idempotence=False,
                             linger_ms=20, batch_size=512 << 10)
    try:
        for i in range(events):
            seq = (i + offset) % sequences
            producer.send(topic, key=f"s{seq:05d}".encode(), value=stream_value(seq, i // sequences))
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=30)


def _settings(bootstrap: str, input_topic: str, output_topic: str, engine: str,
              max_poll_records: int) -> Any:
    from daemon.config import Settings

    group = _unique(f"bench-{engine}")
    return Settings(
        kafka_bootstrap_servers=bootstrap, input_topic=input_topic, output_topic=output_topic,
        group_id=group, model_path=model_file(MODELS[E2E_MODEL]), engine=cast(Any, engine),
        create_topics=True, dlq_topic=f"{output_topic}.dlq", log_level="WARNING",
        kafka_max_poll_records=max_poll_records,
    )


def broker_rate(bootstrap: str, topic: str, partitions: int, timeout_s: float = 30.0) -> tuple[
        int, float | None]:
    """(outputs, events/s) of a LogAppendTime topic: the outputs appended after the
    first output's millisecond, over the span from the first to the last output."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = consumer.end_offsets(tps)
        filled = [tp for tp in tps if ends[tp]]
        total = sum(ends.values())
        if not filled:
            return 0, None
        firsts = consumer.offsets_for_times({tp: 0 for tp in filled})
        t0 = min(v.timestamp for v in firsts.values() if v is not None)
        consumer.assign(filled)
        for tp in filled:
            consumer.seek(tp, ends[tp] - 1)
        last: dict[Any, int] = {}
        deadline = time.monotonic() + timeout_s
        while len(last) < len(filled) and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500).items():
                last[tp] = max([last.get(tp, 0), *(r.timestamp for r in records)])
        if len(last) < len(filled):
            return total, None
        t1 = max(last.values())
        after = consumer.offsets_for_times({tp: t0 + 1 for tp in filled})
        counted = sum(ends[tp] - (a.offset if a is not None else ends[tp]) for tp, a in after.items())
        return total, (counted / ((t1 - t0) / 1000.0) if t1 > t0 else None)
    finally:
        consumer.close()


def _passthrough(settings: Any, target: int, stop: threading.Event, marks: list[tuple[float, int]]
                 ) -> None:
    """The baseline: the daemon's clients, no model. Poll, one send per input (the
    input's key and value), flush, commit the batch's offsets."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from daemon.kafka.clients import make_consumer, make_producer

    consumer = make_consumer(settings)
    producer = make_producer(settings)
    consumer.subscribe([settings.input_topic])
    done = 0
    try:
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=200)
            batch = [rec for tp in sorted(polled, key=lambda t: t.partition) for rec in polled[tp]]
            if not batch:
                continue
            for rec in batch:
                producer.send(settings.output_topic, key=rec.key, value=rec.value)
            producer.flush(timeout=30)
            offsets = {TopicPartition(rec.topic, rec.partition): rec.offset + 1 for rec in batch}
            consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
            marks.append((time.perf_counter(), len(batch)))
            done += len(batch)
            if done >= target:
                stop.set()
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=30)


class _Engines:
    """One loaded model and engine per engine name, reused by every round."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[Any, Any, str | None]] = {}

    def get(self, name: str) -> tuple[Any, Any, str | None]:
        """(model, engine, why fast was refused or None)."""
        if name not in self._made:
            from daemon.inference.engines.factory import make_engine
            from daemon.inference.model import load_model

            model = load_model(model_file(MODELS[E2E_MODEL]))
            engine, refused = make_engine(name, model)
            self._made[name] = (model, engine, refused)
        return self._made[name]


ENGINE_CACHE = _Engines()


def run_lstmd(settings: Any, target: int, timeout_s: float,
              on_thread: Callable[[int], None] | None = None) -> tuple[_Round, Any]:
    """lstmd's run loop in a thread with a fresh state store, until `target` inputs
    are checkpointed. Returns the round and the processor's engine."""
    from daemon.core.processor import Processor
    from daemon.core.state import StateStore
    from daemon.ops.health import Health
    from daemon.ops.metrics import Metrics
    from daemon.streaming.loop import RunLoop

    model, engine, _ = ENGINE_CACHE.get(settings.engine)
    if hasattr(engine, "invalidate"):
        engine.invalidate()
    metrics = Metrics()
    processor = Processor(engine, model_id=str(model.identity), n_features=model.n_features,
                          store=StateStore(settings.max_sequences), metrics=metrics,
                          max_record_bytes=settings.max_record_bytes)
    marks: list[tuple[float, int]] = []
    stop = threading.Event()

    def on_batch(n: int) -> None:
        marks.append((time.perf_counter(), n))
        if sum(k for _, k in marks) >= target:
            stop.set()

    loop = RunLoop(settings, processor, metrics, Health(liveness_timeout_s=3600.0), stop,
                   on_batch=on_batch)
    return _drive(lambda: loop.run(), stop, marks, timeout_s, on_thread), engine


# kafka-python 3.0.12 sometimes joins a fresh group before it has the input topic's
# metadata ("No partition metadata for topic"), gets no partitions, and does not
# rejoin for minutes. Such a round is started again (at most `RETRIES` times).
FIRST_OUTPUT_TIMEOUT_S = 30.0
STALLED = f"stalled: no output within {FIRST_OUTPUT_TIMEOUT_S:.0f} s (group join without partitions)"
RETRIES = 2


def _drive(body: Callable[[], None], stop: threading.Event, marks: list[tuple[float, int]],
           timeout_s: float, on_thread: Callable[[int], None] | None = None) -> _Round:
    """Run `body` in a thread until it returns (it sets `stop` when done) or the timeout."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            body()
        except BaseException as exc:  # reported in the row, never raised through the bench
            failure.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=target, name="bench-contender", daemon=True)
    thread.start()
    if on_thread is not None and thread.ident is not None:
        on_thread(thread.ident)
    started = time.monotonic()
    stalled = timed_out = False
    while not stop.wait(0.5):
        waited = time.monotonic() - started
        if not marks and waited > FIRST_OUTPUT_TIMEOUT_S:
            stalled = True
            break
        if waited > timeout_s:
            timed_out = True
            break
    stop.set()
    thread.join(60)
    round_ = _Round(marks)
    if failure:
        round_.error = f"{type(failure[0]).__name__}: {failure[0]}"
    elif stalled:
        round_.error = STALLED
    elif timed_out:
        round_.error = f"timed out after {timeout_s:.0f} s"
    return round_


def _e2e_row(section: str, engine: str, requested: str, sequences: int, rounds: list[_Round],
             note: str = "") -> Row:
    """The medians over the rounds that completed."""
    windows = [w for r in rounds if not r.error and (w := r.window()) is not None and w[1] > 0]
    cycles = [r.cycles() for r in rounds if not r.error and r.cycles()]
    broker = [r.broker_events_per_s for r in rounds if r.broker_events_per_s]
    errors = sorted({r.error for r in rounds if r.error})
    return {
        "section": section,
        "model": E2E_MODEL,
        "engine": engine,
        "requested": requested,
        "sequences": sequences,
        "events": int(statistics.median(e for e, _ in windows)) if windows else (
            int(statistics.median(r.outputs for r in rounds if r.broker_events_per_s)) if broker else 0),
        "rounds": len(windows) if windows else len(broker),
        "events_per_s": statistics.median(e / t for e, t in windows) if windows else (
            statistics.median(broker) if broker else 0.0),
        "latency_p50_ms": statistics.median(float(np.percentile(c, 50)) for c in cycles) * 1e3
        if cycles else None,
        "latency_p99_ms": statistics.median(float(np.percentile(c, 99)) for c in cycles) * 1e3
        if cycles else None,
        "broker_events_per_s": statistics.median(broker) if broker else None,
        "note": "; ".join([n for n in (note, *errors) if n]),
    }


class E2ESection:
    """Pass-through, then lstmd's run loop with each engine, through the broker (see
    the module docstring). Contenders alternate within each round, so a change in
    the machine's load falls on all of them."""

    name = "e2e"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        bootstrap, input_topic = BROKER.input_topic(config, log)
        contenders = ("passthrough", *config.engines)
        results: dict[str, list[_Round]] = {c: [] for c in contenders}
        engines: dict[str, tuple[str, str]] = {}
        for name in config.engines:  # load before timing anything
            _, engine, refused = ENGINE_CACHE.get(name)
            engines[name] = (engine.name, refused or "")
        for i in range(config.e2e_rounds):
            for contender in contenders:
                target = config.e2e_keras_events if contender == "keras" else config.e2e_events
                target = min(target, config.e2e_events)
                log(f"bench: e2e round {i + 1}/{config.e2e_rounds} {contender} "
                    f"({target:,} events) ...")
                round_ = self.one(bootstrap, input_topic, contender, target, config)
                results[contender].append(round_)
        rows = []
        for contender in contenders:
            engine, note = engines.get(contender, (contender, ""))
            rows.append(_e2e_row(self.name, engine, contender, config.e2e_sequences,
                                 results[contender], note))
        return rows

    @staticmethod
    def one(bootstrap: str, input_topic: str, contender: str, target: int, config: BenchConfig,
            on_thread: Callable[[int], None] | None = None) -> _Round:
        for _ in range(RETRIES):
            round_ = E2ESection._one(bootstrap, input_topic, contender, target, config, on_thread)
            if round_.error != STALLED:
                return round_
        return E2ESection._one(bootstrap, input_topic, contender, target, config, on_thread)

    @staticmethod
    def _one(bootstrap: str, input_topic: str, contender: str, target: int, config: BenchConfig,
             on_thread: Callable[[int], None] | None) -> _Round:
        output = _unique(f"bench-out-{contender}")
        create_topics_for_bench(bootstrap, {output: config.e2e_partitions}, OUTPUT_TOPIC_CONFIG)
        engine = "fast" if contender == "passthrough" else contender
        settings = _settings(bootstrap, input_topic, output, engine, config.e2e_max_poll_records)
        if contender == "passthrough":
            marks: list[tuple[float, int]] = []
            stop = threading.Event()
            round_ = _drive(lambda: _passthrough(settings, target, stop, marks), stop, marks,
                            config.e2e_timeout_s, on_thread)
        else:
            round_, _ = run_lstmd(settings, target, config.e2e_timeout_s, on_thread)
        round_.topic = output
        if not round_.error:
            round_.outputs, round_.broker_events_per_s = broker_rate(
                bootstrap, output, config.e2e_partitions)
            if contender == "fast" and target >= config.e2e_events:
                BROKER.fast_outputs = output
        return round_


# ----------------------------------------------------------------------------- the peer

PEER_REQUIREMENT = "quixstreams>=3.20,<4"
PEER_VENV = "bench-peer-venv"

# The Quix Streams application, run by path by an interpreter that has quixstreams.
# Argument: a JSON object (bootstrap, input, output, group, state_dir, weights, model).
PEER_SCRIPT = Path(__file__).with_name("quix_peer.py")


def _has_quix(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import quixstreams"], capture_output=True,
                              timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def peer_python(config: BenchConfig, log: Log) -> str:
    """An interpreter with quixstreams: the configured one, this one, or a venv made
    (once) in lstmd's cache with `pip install quixstreams`. RuntimeError says why not."""
    if config.peer_python:
        if not _has_quix(config.peer_python):
            raise RuntimeError(f"{config.peer_python} cannot import quixstreams")
        return config.peer_python
    if _has_quix(sys.executable):
        return sys.executable
    from daemon.devtools.localkafka import cache_dir

    venv = cache_dir().parent / PEER_VENV
    python = venv / "bin" / "python"
    if python.exists() and _has_quix(str(python)):
        return str(python)
    log(f"bench: quixstreams is missing: installing {PEER_REQUIREMENT} and numpy into {venv} "
        "(once; a venv of its own because quixstreams pins pydantic below lstmd's) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True,
                       timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", PEER_REQUIREMENT, "numpy"],
                       check=True, capture_output=True, timeout=900)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"pip install {PEER_REQUIREMENT} failed: {' '.join(tail)}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"pip install {PEER_REQUIREMENT} failed: {exc}") from None
    if not _has_quix(str(python)):
        raise RuntimeError(f"quixstreams installed in {venv} but cannot be imported")
    return str(python)


def peer_weights(path: Path) -> Path:
    """The demo model's weights as NumPy arrays for the peer's step (keras extracts them)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.models.load_model(model_file(MODELS[E2E_MODEL]), compile=False)
    lstm = next(layer for layer in model.layers if isinstance(layer, keras.layers.LSTM))
    dense = next(layer for layer in model.layers if isinstance(layer, keras.layers.Dense))
    kernel, recurrent, bias = (np.asarray(w, dtype=np.float32) for w in lstm.get_weights())
    dense_kernel, dense_bias = (np.asarray(w, dtype=np.float32) for w in dense.get_weights())
    np.savez(path, kernel=kernel, recurrent=recurrent, bias=bias, dense_kernel=dense_kernel,
             dense_bias=dense_bias)
    return path


class _EndOffsets:
    """The number of records in a topic, asked of the broker (no group, no fetch)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                      enable_auto_commit=False)
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]

    def __call__(self) -> int:
        return sum(self.consumer.end_offsets(self.tps).values())

    def close(self) -> None:
        self.consumer.close()


def read_predictions(bootstrap: str, topic: str, partitions: int, limit: int,
                     timeout_s: float = 60.0) -> dict[tuple[int, int], list[float]]:
    """Up to `limit` predictions of an output topic: (input partition, offset) -> y."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = consumer.end_offsets(tps)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        wanted = min(limit, sum(ends.values()))
        out: dict[tuple[int, int], list[float]] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < wanted and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for rec in records:
                    value = orjson.loads(rec.value)
                    if "y" in value:
                        out[(value["partition"], value["offset"])] = value["y"]
        return out
    finally:
        consumer.close()


def compare_predictions(bootstrap: str, ours: str, theirs: str, partitions: int,
                        limit: int = 5000) -> tuple[int, float | None]:
    """(how many, max |y difference|) over the predictions of the same inputs in
    both topics (at most `limit` read from each): the peer does the same job."""
    a = read_predictions(bootstrap, ours, partitions, limit)
    b = read_predictions(bootstrap, theirs, partitions, limit)
    common = a.keys() & b.keys()
    if not common:
        return 0, None
    return len(common), max(
        float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in common)


@contextlib.contextmanager
def outputs_closed(counter: _EndOffsets) -> Iterator[_EndOffsets]:
    try:
        yield counter
    finally:
        counter.close()


class PeerSection:
    """The same job as a Quix Streams application (see the module docstring)."""

    name = "peer"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        try:
            python = peer_python(config, log)
        except RuntimeError as exc:
            log(f"bench: peer skipped: {exc}")
            return [self._row(config, [], f"skipped: {exc}")]
        bootstrap, input_topic = BROKER.input_topic(config, log)
        weights = peer_weights(_work_dir() / "peer-weights.npz")
        script = PEER_SCRIPT
        model_id = str(ENGINE_CACHE.get("fast")[0].identity)
        rounds = []
        for i in range(config.e2e_rounds):
            log(f"bench: peer round {i + 1}/{config.e2e_rounds} quix ({config.e2e_events:,} events) ...")
            rounds.append(self.one(python, script, weights, model_id, bootstrap, input_topic, config))
        row = self._row(config, rounds, "")
        done = next((r for r in rounds if not r.error), None)
        if done is not None and BROKER.fast_outputs:
            log("bench: peer: comparing its predictions with lstmd fast's ...")
            row["parity_compared"], row["parity_max_abs_dy"] = compare_predictions(
                bootstrap, BROKER.fast_outputs, done.topic, config.e2e_partitions)
        return [row]

    def _row(self, config: BenchConfig, rounds: list[_Round], note: str) -> Row:
        row = _e2e_row(self.name, "quix", "quix", config.e2e_sequences, rounds, note)
        row["latency_p50_ms"] = row["latency_p99_ms"] = None
        return row

    @staticmethod
    def one(python: str, script: Path, weights: Path, model_id: str, bootstrap: str,
            input_topic: str, config: BenchConfig) -> _Round:
        output = _unique("bench-out-quix")
        create_topics_for_bench(bootstrap, {output: config.e2e_partitions}, OUTPUT_TOPIC_CONFIG)
        state_dir = Path(tempfile.mkdtemp(prefix="quix-state-", dir=_work_dir()))
        args = {"bootstrap": bootstrap, "input": input_topic, "output": output,
                "group": _unique("bench-quix"), "state_dir": str(state_dir),
                "weights": str(weights), "model": model_id}
        log_path = state_dir / "peer.log"
        outputs = _EndOffsets(bootstrap, output, config.e2e_partitions)
        round_ = _Round([])
        with outputs_closed(outputs), log_path.open("wb") as out:
            proc = subprocess.Popen([python, str(script), json.dumps(args)], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + config.e2e_timeout_s
            try:
                while outputs() < config.e2e_events:
                    if proc.poll() is not None:
                        round_.error = f"the peer exited with code {proc.returncode}: " + \
                            log_path.read_text(errors="replace")[-500:]
                        break
                    if time.monotonic() > deadline:
                        round_.error = f"timed out after {config.e2e_timeout_s:.0f} s"
                        break
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        shutil.rmtree(state_dir, ignore_errors=True)
        round_.topic = output
        if not round_.error:
            round_.outputs, round_.broker_events_per_s = broker_rate(
                bootstrap, output, config.e2e_partitions)
        return round_


# ----------------------------------------------------------------------------- the profile

# (file suffix, function or None for any, text in the source line or None, phase),
# tried on each frame from the innermost outwards; the first match names the sample.
PHASE_RULES: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("prometheus_client", None, None, "prometheus metrics"),
    ("daemon/core/codec.py", "decode", None, "codec.decode"),
    ("daemon/core/codec.py", "_flag", None, "codec.decode"),
    ("daemon/core/codec.py", "_features", None, "codec.decode"),
    ("daemon/core/codec.py", "encode_prediction", None, "encode_prediction"),
    ("daemon/inference/engines/fast.py", None, None, "engine step"),
    ("daemon/inference/engines/contract.py", None, None, "engine step"),
    ("daemon/core/state.py", "snapshot", None, "state snapshots (take_changes)"),
    ("daemon/core/state.py", "take_changes", None, "state snapshots (take_changes)"),
    ("daemon/core/state.py", None, None, "processor bookkeeping"),
    ("daemon/core/processor.py", None, "engine.step", "engine step"),
    ("daemon/core/processor.py", None, None, "processor bookkeeping"),
    ("daemon/streaming/delivery.py", "_send", "state_topic_name", "producer.send (state records)"),
    ("daemon/streaming/delivery.py", "_send", None, "producer.send (outputs)"),
    ("daemon/streaming/delivery.py", "_publish", "flush", "flush (wait for acks)"),
    ("daemon/streaming/delivery.py", "_publish", "succeeded", "futures check"),
    ("daemon/streaming/delivery.py", "_publish", "failed", "futures check"),
    ("daemon/streaming/delivery.py", "_account", None, "checkpoint accounting"),
    ("daemon/streaming/delivery.py", "_commit_offsets", None, "offset commit"),
    ("daemon/streaming/delivery.py", None, None, "checkpoint other"),
    ("daemon/streaming/loop.py", None, "consumer.poll", "poll (fetch, parse: kafka-python)"),
    ("daemon/streaming/loop.py", None, "take_changes", "state snapshots (take_changes)"),
    ("daemon/streaming/loop.py", None, "StateRecord", "state snapshots (take_changes)"),
    ("daemon/streaming/loop.py", "_housekeeping", None, "housekeeping"),
    ("daemon/streaming/loop.py", None, None, "run loop other"),
)
IDLE_FUNCTIONS = frozenset({"select", "poll", "wait", "sleep", "_wait_for_tstate_lock", "acquire"})


def classify(frame: Any) -> str:
    """The phase of a sample: the first rule matching a frame, innermost first."""
    f = frame
    while f is not None:
        code = f.f_code
        filename = code.co_filename.replace(os.sep, "/")
        for suffix, function, text, phase in PHASE_RULES:
            if suffix not in filename or (function is not None and code.co_name != function):
                continue
            if text is not None and text not in linecache.getline(code.co_filename, f.f_lineno):
                continue
            return phase
        f = f.f_back
    return "other"


class Sampler:
    """A statistical profiler of one thread: every `interval` seconds, the phase of
    its current stack (wall time: waiting on the network counts where it waits), and
    whether each other thread was busy or blocked."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.target: int | None = None
        self.samples: list[tuple[float, str]] = []
        self.others: dict[str, list[int]] = {}  # thread name -> [busy, idle]
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self, target: int) -> None:
        """Sample thread `target` (again called for a retried round: switch to it)."""
        self.target = target
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(5)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._halt.wait(self.interval):
            now = time.perf_counter()
            frames = sys._current_frames()
            frame = frames.get(self.target) if self.target is not None else None
            if frame is not None:
                self.samples.append((now, classify(frame)))
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, other in frames.items():
                if ident in (me, self.target):
                    continue
                busy = other.f_code.co_name not in IDLE_FUNCTIONS
                counts = self.others.setdefault(names.get(ident, str(ident)), [0, 0])
                counts[0 if busy else 1] += 1


class ProfileSection:
    """One fast e2e round under the sampler (see the module docstring)."""

    name = "profile"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        bootstrap, input_topic = BROKER.input_topic(config, log)
        ENGINE_CACHE.get("fast")
        sampler = Sampler(config.profile_interval_s)
        log(f"bench: profile: one fast e2e round ({config.e2e_events:,} events), "
            f"sampling every {config.profile_interval_s * 1e3:g} ms ...")
        # A thread holding the GIL gives it up only every switch interval (5 ms): the
        # sampler would mostly see the run loop when it blocks. A short one lets the
        # sampler in while the run loop computes.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, config.profile_interval_s / 5))
        try:
            round_ = E2ESection.one(bootstrap, input_topic, "fast", config.e2e_events, config,
                                    on_thread=sampler.start)
        finally:
            sys.setswitchinterval(interval)
            sampler.stop()
        return profile_rows(round_, sampler)


def profile_rows(round_: _Round, sampler: Sampler) -> list[Row]:
    """Microseconds per event by phase, over the round's timing window."""
    window = round_.window()
    if round_.error or window is None:
        return [{"section": "profile", "model": E2E_MODEL, "engine": "fast", "requested": "fast",
                 "phase": "(failed)", "us_per_event": None, "share": None, "samples": 0,
                 "note": round_.error or "no timing window"}]
    events, seconds = window
    start, end = round_.marks[0][0], round_.marks[-1][0]
    inside = [phase for t, phase in sampler.samples if start <= t <= end]
    counts: dict[str, int] = {}
    for phase in inside:
        counts[phase] = counts.get(phase, 0) + 1
    total = len(inside) or 1
    rows: list[Row] = []
    for phase, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        rows.append({
            "section": "profile", "model": E2E_MODEL, "engine": "fast", "requested": "fast",
            "phase": phase, "us_per_event": n / total * seconds / events * 1e6,
            "share": n / total, "samples": n, "note": "",
        })
    threads = {name: busy / max(1, busy + idle) for name, (busy, idle) in sampler.others.items()
               if busy + idle}
    rows.append({
        "section": "profile", "model": E2E_MODEL, "engine": "fast", "requested": "fast",
        "phase": "(total)", "us_per_event": seconds / events * 1e6, "share": 1.0, "samples": total,
        "events": events, "events_per_s": events / seconds, "threads_busy": threads, "note": "",
    })
    return rows


SECTIONS: dict[str, Section] = {
    "engine": EngineSection(), "e2e": E2ESection(), "peer": PeerSection(),
    "profile": ProfileSection(),
}


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
    """Run the configured sections; the report: meta, rows (with ratios), summary."""
    check(config)
    say: Log = log or (lambda _msg: None)
    started = time.time()
    rows: list[Row] = []
    try:
        for name in config.sections:
            rows.extend(SECTIONS[name].run(config, say))
    finally:
        BROKER.close()
    add_ratios(rows)
    return {"meta": _meta(config, time.time() - started), "rows": rows, "summary": summary(rows)}


def add_ratios(rows: list[Row]) -> None:
    """Set each row's vs_keras: its events/s over the keras row's of the same
    section, model and sequences (None without such a row); and for end-to-end
    rows (e2e, peer) vs_passthrough: over the e2e pass-through row's."""
    keras_rows = {
        (r["section"], r["model"], r["sequences"]): r["events_per_s"]
        for r in rows if r["engine"] == "keras" and r["requested"] == "keras"
    }
    passthrough = {
        (r["model"], r["sequences"]): r["events_per_s"]
        for r in rows if r["section"] == "e2e" and r["requested"] == "passthrough"
    }
    for r in rows:
        if "sequences" not in r:  # a profile row
            continue
        base = keras_rows.get((r["section"], r["model"], r["sequences"]))
        r["vs_keras"] = r["events_per_s"] / base if base else None
        if r["section"] in ("e2e", "peer"):
            base = passthrough.get((r["model"], r["sequences"]))
            r["vs_passthrough"] = r["events_per_s"] / base if base else None


def summary(rows: list[Row]) -> dict[str, float | None]:
    """The end-to-end ratios the issue asks for (None when a side is missing):
    fast over pass-through (target >= 0.70), fast over keras, and fast over the
    peer, the last both with lstmd's own timing and, like the peer's, from the
    broker's append times."""
    def find(section: str, requested: str) -> Row | None:
        return next((r for r in rows if r["section"] == section and r["requested"] == requested
                     and r.get("events_per_s")), None)

    def ratio(a: Row | None, b: Row | None, key: str = "events_per_s") -> float | None:
        if a is None or b is None or not a.get(key) or not b.get(key):
            return None
        return float(a[key]) / float(b[key])

    fast, keras, passthrough, peer = (find("e2e", "fast"), find("e2e", "keras"),
                                      find("e2e", "passthrough"), find("peer", "quix"))
    return {
        "fast_vs_passthrough": ratio(fast, passthrough),
        "fast_vs_keras": ratio(fast, keras),
        "fast_vs_peer": ratio(fast, peer),
        "fast_vs_peer_broker_timed": ratio(fast, peer, "broker_events_per_s"),
        "passthrough_vs_peer_broker_timed": ratio(passthrough, peer, "broker_events_per_s"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(config: BenchConfig, seconds: float) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "config": asdict(config),
        "models": {name: MODELS[name].description for name in config.models}
        if "engine" in config.sections else {},
        "seconds": round(seconds, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
    }
    if {"e2e", "peer", "profile"} & set(config.sections):
        meta["models"].setdefault(E2E_MODEL, MODELS[E2E_MODEL].description)
        meta["e2e"] = (
            f"{config.e2e_events:,} events of {config.e2e_sequences} interleaved sequences, input "
            f"topic of {config.e2e_partitions} partitions, max.poll.records {config.e2e_max_poll_records}, "
            f"keras stops after {config.e2e_keras_events:,}; medians of {config.e2e_rounds} rounds")
    try:
        import keras
        import tensorflow as tf

        meta["tensorflow"] = tf.__version__
        meta["keras"] = keras.__version__
        from importlib.metadata import version

        meta["kafka_python"] = version("kafka-python")
    except ImportError:  # pragma: no cover - all are dependencies
        pass
    return meta


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _aligned(lines: list[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def format_table(report: dict[str, Any]) -> str:
    """The rows as an aligned text table, the engines of one configuration together;
    then the end-to-end ratios and the profile, if they were run."""
    rows = [r for r in report["rows"] if r["section"] != "profile"]
    meta = report["meta"]
    cfg = meta["config"]
    out: list[str] = []
    if rows:
        end_to_end = any(r["section"] in ("e2e", "peer") for r in rows)
        header = ("section", "model", "seqs", "engine", "events/s", "p50 ms", "p99 ms", "vs keras",
                  "events") + (("vs pass", "broker ev/s") if end_to_end else ())
        lines: list[Sequence[str]] = [header]
        first: dict[Any, int] = {}
        for i, r in enumerate(rows):
            first.setdefault((r["section"],), i)
            first.setdefault((r["section"], r["model"]), i)
        # Engines side by side: grouped by section, model and sequences, in run order.
        ordered = sorted(rows, key=lambda r: (
            first[(r["section"],)], first[(r["section"], r["model"])], r["sequences"]))
        for r in ordered:
            engine = r["engine"] if r["engine"] == r["requested"] else \
                f"{r['engine']} (asked {r['requested']})"
            line: tuple[str, ...] = (
                r["section"], r["model"], str(r["sequences"]), engine,
                f"{r['events_per_s']:,.0f}", _fmt(r["latency_p50_ms"], ".3f"),
                _fmt(r["latency_p99_ms"], ".3f"), _fmt(r.get("vs_keras"), ".1f", "x"),
                str(r["events"]),
            )
            if end_to_end:
                line += (_fmt(r.get("vs_passthrough"), ".2f"), _fmt(r.get("broker_events_per_s"), ",.0f"))
            lines.append(line)
        out += _aligned(lines, {2, 4, 5, 6, 7, 8, 9, 10})
        out.append("")
        if any(r["section"] == "engine" for r in rows):
            out.append(
                f"engine: medians of {cfg['rounds']} rounds; events = per round and configuration; "
                "latency per event = duration of the step (wave) that computed it")
        if end_to_end:
            out.append(
                f"e2e/peer: {meta.get('e2e', '')}. events/s = inputs of poll batches 2..K over the "
                "time from the end of batch 1's checkpoint to the end of batch K's; p50/p99 = a "
                "poll-process-checkpoint cycle; broker ev/s = from the output records' broker append "
                "times (the peer's only measure); vs pass = events/s over the pass-through's")
        out.append("vs keras = events/s over keras's (same section, model, sequences)")
        for name, description in meta["models"].items():
            out.append(f"{name}: {description}")
    ratios = report.get("summary") or {}
    if any(v is not None for v in ratios.values()):
        out.append("")
        out.append("end to end: " + ", ".join(
            f"{name.replace('_vs_', '/').replace('_broker_timed', ' (broker-timed)')} {value:.2f}"
            for name, value in ratios.items() if value is not None)
            + " (target fast/passthrough >= 0.70)")
    profile = [r for r in report["rows"] if r["section"] == "profile"]
    if profile:
        out.append("")
        total = next((r for r in profile if r["phase"] == "(total)"), None)
        if total is not None:
            out.append(f"profile: fast run loop, wall time per event by phase ({total['samples']} samples, "
                       f"{total['events']:,} events at {total['events_per_s']:,.0f}/s)")
        lines = [("phase", "us/event", "share")]
        for r in profile:
            lines.append((r["phase"], _fmt(r["us_per_event"], ".2f"), _fmt(
                None if r["share"] is None else r["share"] * 100, ".1f", "%")))
        out += _aligned(lines, {1, 2})
        if total is not None and total.get("threads_busy"):
            out.append("other threads busy: " + ", ".join(
                f"{name} {share * 100:.0f}%" for name, share in sorted(total["threads_busy"].items())))
    for r in report["rows"]:
        if r.get("parity_compared"):
            out.append(f"peer parity: {r['parity_compared']:,} of its predictions compared with lstmd "
                       f"fast's for the same inputs: max |y difference| {r['parity_max_abs_dy']:.1e}")
    notes = {r["note"] for r in report["rows"] if r.get("note")}
    out.extend(f"note: {note}" for note in sorted(notes))
    out.append(f"{meta['cpus']} CPUs ({meta.get('cpu', '?')}), load average {meta['load_average']}, "
               f"{meta['seconds']} s")
    return "\n".join(out)


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_ints(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in parse_list(text))
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    """`lstmd bench`'s options (also `python -m daemon.devtools.bench`)."""
    p.add_argument("--sections", default="engine,e2e",
                   help=f"comma-separated, of {', '.join(SECTIONS)} (default: engine,e2e)")
    p.add_argument("--peer", action="store_true",
                   help="add the peer section: the same job as a Quix Streams application "
                        "(installs quixstreams into a venv of its own if missing)")
    p.add_argument("--profile", action="store_true",
                   help="add the profile section: where the fast run loop's time goes per event")
    p.add_argument("--models", default="demo,lstm64x16",
                   help="engine section, comma-separated (default: demo,lstm64x16)")
    p.add_argument("--engines", default="keras,fast", help="comma-separated (default: keras,fast)")
    p.add_argument("--sequences", default="1,64,1000",
                   help="engine section: interleaved sequence counts, comma-separated "
                        "(default: 1,64,1000)")
    p.add_argument("--rounds", type=int, default=5,
                   help="engine section: rounds per configuration (default: 5)")
    p.add_argument("--events", type=int, default=10_000,
                   help="engine section: events per round and configuration, fast engine "
                        "(default: 10000)")
    p.add_argument("--keras-events", type=int, default=600,
                   help="engine section: events per round and configuration, keras engine "
                        "(default: 600)")
    p.add_argument("--min-round-seconds", type=float, default=0.25,
                   help="engine section: least time stepped per round and configuration "
                        "(default: 0.25)")
    p.add_argument("--e2e-events", type=int, default=20_000,
                   help="end to end: events produced, read by pass-through, fast and the peer "
                        "(default: 20000)")
    p.add_argument("--e2e-keras-events", type=int, default=2_000,
                   help="end to end: keras stops after these (default: 2000)")
    p.add_argument("--e2e-sequences", type=int, default=1000,
                   help="end to end: interleaved sequences (default: 1000)")
    p.add_argument("--e2e-rounds", type=int, default=3,
                   help="end to end: rounds per contender (default: 3)")
    p.add_argument("--e2e-max-poll-records", type=int, default=500,
                   help="end to end: LSTMD_KAFKA_MAX_POLL_RECORDS of lstmd and the pass-through "
                        "(default: 500, the daemon's)")
    p.add_argument("--bootstrap", help="end to end: a running broker (default: a local one)")
    p.add_argument("--peer-python", help="peer: an interpreter that has quixstreams")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """ValueError for a bad value."""
    sections = parse_list(args.sections)
    extra = tuple(name for name, wanted in (("peer", args.peer), ("profile", args.profile))
                  if wanted and name not in sections)
    config = BenchConfig(
        sections=sections + extra,
        models=parse_list(args.models),
        engines=parse_list(args.engines),
        sequences=parse_ints(args.sequences),
        rounds=max(1, args.rounds),
        events=max(1, args.events),
        keras_events=max(1, args.keras_events),
        min_round_s=max(0.0, args.min_round_seconds),
        e2e_events=max(1, args.e2e_events),
        e2e_keras_events=max(1, args.e2e_keras_events),
        e2e_sequences=max(1, args.e2e_sequences),
        e2e_rounds=max(1, args.e2e_rounds),
        e2e_max_poll_records=max(1, args.e2e_max_poll_records),
        bootstrap=args.bootstrap or None,
        peer_python=args.peer_python or None,
    )
    check(config)
    return config


def cli(args: argparse.Namespace) -> int:
    """Run the bench from parsed arguments; 2 for a bad configuration."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"lstmd bench: {exc}", file=sys.stderr)
        return 2
    from daemon.ops import logs

    logs.configure("WARNING", "console")  # on stderr: stdout carries the report
    report = run(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.devtools.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
