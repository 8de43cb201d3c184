"""The `e2e` section: events per second through a real Kafka broker.

The broker is the project's LocalKafka, started for the run unless
`BenchConfig.bootstrap` names one (broker.py). `e2e_events` events of
`e2e_sequences` interleaved sequences of the demo model's shape (`{"x": [v]}`)
are produced once to an input topic of `e2e_partitions` partitions; then, in
each round, in turn: `passthrough`, a consume-produce loop with no model on the
daemon's own clients (the port's backend of LSTMD_KAFKA_CLIENT): poll, one send
per input, flush, commit per poll batch; and lstmd's real run loop
(daemon.streaming.loop.RunLoop, in-process, in a thread, at-least-once, state
topic included) with each engine. Every contender reads
the whole input topic from the start under a fresh consumer group and writes to
its own output topic. Timing: from the end of the first poll batch's checkpoint
(its outputs acknowledged, offsets committed: the first outputs have appeared)
to the end of the last one's; events = the inputs of the batches in between (so
group join, restore, model start-up and TensorFlow are outside). keras stops
after `e2e_keras_events`. The latency columns are the median and 99th
percentile of a poll-process-checkpoint cycle. Each row also carries
`broker_events_per_s`: the same run measured from the broker's append times of
the output records (output topics are LogAppendTime): outputs appended after
the first one's millisecond over the span from the first to the last; it
agrees with events/s within about one poll batch and is how the peer is
measured.

With the fast engine, two more contenders run lstmd as a pod runs it: `python -m
daemon run` as a subprocess, configured by its LSTMD_* variables with the fast
engine and every other setting at its default, so LSTMD_WORKERS is this
machine's CPU count (`pod`: the per-pod figure); and the same with
LSTMD_WORKERS=1 (`pod-1`: one process, the per-core figure). Like the peer,
they are timed from the broker's append times only and stopped by SIGTERM once
all outputs are in (`BenchConfig.e2e_pod`; `--no-e2e-pod` leaves them out).

The run loop is measured through its public `on_batch` hook. `Round`,
`e2e_row`, `ENGINE_CACHE` and `E2ESection.one` also serve the peer and the
profile.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from daemon.devtools.bench.broker import (
    BROKER,
    OUTPUT_TOPIC_CONFIG,
    broker_rate,
    create_topics_for_bench,
    run_until_outputs,
    unique,
)
from daemon.devtools.bench.config import E2E_MODEL, MODELS, BenchConfig, Log, Row
from daemon.devtools.bench.files import model_file, work_dir

#: lstmd run as a subprocess: "pod" with the default LSTMD_WORKERS, "pod-1" with one.
POD_CONTENDERS = {"pod": None, "pod-1": "1"}


@dataclass
class Round:
    """One contender's round: checkpoint marks (perf_counter at the end of each poll
    batch's checkpoint, inputs in the batch), what went wrong, the broker's view."""

    marks: list[tuple[float, int]]
    error: str = ""
    broker_events_per_s: float | None = None
    outputs: int = 0
    topic: str = ""  # where the outputs went
    cpu_us_per_event: float | None = None  # a contender in its own process: its CPU per event

    def window(self) -> tuple[int, float] | None:
        """Inputs of batches 2..K and the time from the end of batch 1 to the end of batch K."""
        if len(self.marks) < 2:
            return None
        events = sum(n for _, n in self.marks[1:])
        return events, self.marks[-1][0] - self.marks[0][0]

    def cycles(self) -> list[float]:
        return [b - a for (a, _), (b, _) in itertools.pairwise(self.marks)]


def lstmd_settings(
    bootstrap: str,
    input_topic: str,
    output_topic: str,
    engine: str,
    max_poll_records: int = 500,
    model_name: str = E2E_MODEL,
) -> Any:
    """The daemon's settings for a contender: every one at its default but the
    round's topics and group, the model, the engine and max.poll.records."""
    from daemon.config import Settings

    group = unique(f"bench-{engine}")
    return Settings(
        kafka_bootstrap_servers=bootstrap,
        input_topic=input_topic,
        output_topic=output_topic,
        group_id=group,
        model_path=model_file(MODELS[model_name]),
        engine=cast(Any, engine),
        create_topics=True,
        dlq_topic=f"{output_topic}.dlq",
        log_level="WARNING",
        kafka_max_poll_records=max_poll_records,
    )


def _passthrough(settings: Any, target: int, stop: threading.Event, marks: list[tuple[float, int]]) -> None:
    """The baseline: the daemon's clients, no model. Poll, one send per input (the
    input's key and value), flush, commit the batch's offsets."""
    from daemon.kafka.backends import make_backend
    from daemon.kafka.port import RebalanceEvents, TopicPartition

    backend = make_backend(settings)
    consumer = backend.consumer()
    producer = backend.producer(None)
    consumer.subscribe(settings.input_topic, RebalanceEvents())
    done = 0
    try:
        while not stop.is_set():
            polled = consumer.poll(200)
            batch = [rec for tp in sorted(polled, key=lambda t: t.partition) for rec in polled[tp]]
            if not batch:
                continue
            for rec in batch:
                producer.send(settings.output_topic, partition=None, key=rec.key, value=rec.value)
            producer.flush(timeout=30)
            offsets = {TopicPartition(rec.topic, rec.partition): rec.offset + 1 for rec in batch}
            consumer.commit(offsets, timeout_ms=30_000)
            marks.append((time.perf_counter(), len(batch)))
            done += len(batch)
            if done >= target:
                stop.set()
    finally:
        consumer.close(5000)
        producer.close(timeout=30)


def pod_workers(workers: str | None) -> int:
    """How many workers `lstmd run` starts with LSTMD_WORKERS = `workers` (None:
    the variable as this environment has it, else the CPU quota's default)."""
    from daemon.ops.cpus import available_cpus

    value = workers if workers is not None else os.environ.get("LSTMD_WORKERS")
    return int(value) if value else available_cpus()


def pod_env(settings: Any, workers: str | None) -> dict[str, str]:
    """The environment of `lstmd run` for a pod contender: this one's, with the
    round's topics and group, the fast engine, and LSTMD_WORKERS = `workers` (None:
    as this environment has it)."""
    env = dict(os.environ)
    env |= {
        "LSTMD_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "LSTMD_INPUT_TOPIC": settings.input_topic,
        "LSTMD_OUTPUT_TOPIC": settings.output_topic,
        "LSTMD_DLQ_TOPIC": settings.dlq_topic,
        "LSTMD_GROUP_ID": settings.group_id,
        "LSTMD_MODEL_PATH": str(settings.model_path),
        "LSTMD_ENGINE": "fast",
        "LSTMD_CREATE_TOPICS": "true",
        "LSTMD_LOG_LEVEL": "WARNING",
        "LSTMD_HTTP_PORT": "0",
        "LSTMD_KAFKA_MAX_POLL_RECORDS": str(settings.kafka_max_poll_records),
    }
    if workers is not None:
        env["LSTMD_WORKERS"] = workers
    return env


def _pod(settings: Any, workers: str | None, target: int, config: BenchConfig) -> Round:
    """`python -m daemon run` until `target` outputs are in (timed by the broker)."""
    logs = Path(tempfile.mkdtemp(prefix="lstmd-pod-", dir=work_dir()))
    try:
        run = run_until_outputs(
            [sys.executable, "-m", "daemon", "run"],
            logs / "lstmd.log",
            (settings.kafka_bootstrap_servers, settings.output_topic, config.e2e_partitions),
            target,
            config.e2e_timeout_s,
            env=pod_env(settings, workers),
        )
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    round_ = Round([], error=f"lstmd run {run.error}" if run.error else "")
    round_.cpu_us_per_event = run.cpu_us_per_event
    return round_


class Engines:
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


ENGINE_CACHE = Engines()


def run_lstmd(
    settings: Any, target: int, timeout_s: float, on_thread: Callable[[int], None] | None = None
) -> tuple[Round, Any]:
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
    processor = Processor(
        engine,
        model_id=str(model.identity),
        n_features=model.n_features,
        store=StateStore(settings.max_sequences),
        metrics=metrics,
        max_record_bytes=settings.max_record_bytes,
    )
    marks: list[tuple[float, int]] = []
    stop = threading.Event()

    def on_batch(n: int) -> None:
        marks.append((time.perf_counter(), n))
        if sum(k for _, k in marks) >= target:
            stop.set()

    loop = RunLoop(settings, processor, metrics, Health(liveness_timeout_s=3600.0), stop, on_batch=on_batch)
    return _drive(lambda: loop.run(), stop, marks, timeout_s, on_thread), engine


# kafka-python 3.0.12 sometimes joins a fresh group before it has the input topic's
# metadata ("No partition metadata for topic"), gets no partitions, and does not
# rejoin for minutes. Such a round is started again (at most `RETRIES` times).
FIRST_OUTPUT_TIMEOUT_S = 30.0
STALLED = f"stalled: no output within {FIRST_OUTPUT_TIMEOUT_S:.0f} s (group join without partitions)"
RETRIES = 2


def _drive(
    body: Callable[[], None],
    stop: threading.Event,
    marks: list[tuple[float, int]],
    timeout_s: float,
    on_thread: Callable[[int], None] | None = None,
) -> Round:
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
    round_ = Round(marks)
    if failure:
        round_.error = f"{type(failure[0]).__name__}: {failure[0]}"
    elif stalled:
        round_.error = STALLED
    elif timed_out:
        round_.error = f"timed out after {timeout_s:.0f} s"
    return round_


def e2e_row(
    section: str, engine: str, requested: str, sequences: int, rounds: list[Round], note: str = ""
) -> Row:
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
        "events": int(statistics.median(e for e, _ in windows))
        if windows
        else (int(statistics.median(r.outputs for r in rounds if r.broker_events_per_s)) if broker else 0),
        "rounds": len(windows) if windows else len(broker),
        "events_per_s": statistics.median(e / t for e, t in windows)
        if windows
        else (statistics.median(broker) if broker else 0.0),
        "latency_p50_ms": statistics.median(float(np.percentile(c, 50)) for c in cycles) * 1e3
        if cycles
        else None,
        "latency_p99_ms": statistics.median(float(np.percentile(c, 99)) for c in cycles) * 1e3
        if cycles
        else None,
        "broker_events_per_s": statistics.median(broker) if broker else None,
        "cpu_us_per_event": statistics.median(cpu)
        if (cpu := [r.cpu_us_per_event for r in rounds if r.cpu_us_per_event])
        else None,
        "note": "; ".join([n for n in (note, *errors) if n]),
    }


class E2ESection:
    """Pass-through, then lstmd's run loop with each engine, through the broker (see
    the module docstring). Contenders alternate within each round, so a change in
    the machine's load falls on all of them."""

    name = "e2e"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        bootstrap, input_topic = BROKER.input_topic(config, log)
        pods = tuple(POD_CONTENDERS) if config.e2e_pod and "fast" in config.engines else ()
        contenders = ("passthrough", *config.engines, *pods)
        results: dict[str, list[Round]] = {c: [] for c in contenders}
        engines: dict[str, tuple[str, str]] = {}
        for name in config.engines:  # load before timing anything
            _, engine, refused = ENGINE_CACHE.get(name)
            engines[name] = (engine.name, refused or "")
        for pod in pods:
            workers = pod_workers(POD_CONTENDERS[pod])
            engines[pod] = (f"fast, {workers} worker{'s' if workers > 1 else ''}", "")
        for i in range(config.e2e_rounds):
            for contender in contenders:
                target = config.e2e_keras_events if contender == "keras" else config.e2e_events
                target = min(target, config.e2e_events)
                log(f"bench: e2e round {i + 1}/{config.e2e_rounds} {contender} ({target:,} events) ...")
                round_ = self.one(bootstrap, input_topic, contender, target, config)
                results[contender].append(round_)
        rows = []
        for contender in contenders:
            engine, note = engines.get(contender, (contender, ""))
            rows.append(e2e_row(self.name, engine, contender, config.e2e_sequences, results[contender], note))
        return rows

    @staticmethod
    def one(
        bootstrap: str,
        input_topic: str,
        contender: str,
        target: int,
        config: BenchConfig,
        on_thread: Callable[[int], None] | None = None,
    ) -> Round:
        for _ in range(RETRIES):
            round_ = E2ESection._one(bootstrap, input_topic, contender, target, config, on_thread)
            if round_.error != STALLED:
                return round_
        return E2ESection._one(bootstrap, input_topic, contender, target, config, on_thread)

    @staticmethod
    def _one(
        bootstrap: str,
        input_topic: str,
        contender: str,
        target: int,
        config: BenchConfig,
        on_thread: Callable[[int], None] | None,
    ) -> Round:
        output = unique(f"bench-out-{contender}")
        create_topics_for_bench(bootstrap, {output: config.e2e_partitions}, OUTPUT_TOPIC_CONFIG)
        engine = contender if contender in ("keras", "fast") else "fast"
        settings = lstmd_settings(bootstrap, input_topic, output, engine, config.e2e_max_poll_records)
        if contender in POD_CONTENDERS:
            round_ = _pod(settings, POD_CONTENDERS[contender], target, config)
        elif contender == "passthrough":
            marks: list[tuple[float, int]] = []
            stop = threading.Event()
            round_ = _drive(
                lambda: _passthrough(settings, target, stop, marks),
                stop,
                marks,
                config.e2e_timeout_s,
                on_thread,
            )
        else:
            round_, _ = run_lstmd(settings, target, config.e2e_timeout_s, on_thread)
        round_.topic = output
        if not round_.error:
            round_.outputs, round_.broker_events_per_s = broker_rate(bootstrap, output, config.e2e_partitions)
            if contender == "fast" and target >= config.e2e_events:
                BROKER.fast_outputs = output
        return round_
