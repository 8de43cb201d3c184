"""The `latency` section: how long an event takes at a steady rate, through lstmd
(with each backend of its Kafka client port) and through the Quix peer.

Throughput sections push a backlog through as fast as they can; a production
stream arrives at a rate, and what its users see is each event's delay. Here a
producer (a thread of the bench) paces `latency_rate` events per second of the
versus job (versus.py: `versus_sequences` keys of the `versus_model`'s features,
`versus_partitions` partitions) for `latency_seconds` into a fresh input topic,
while one contender serves it in a process of its own: `lstmd` is `lstmd run`
with LSTMD_WORKERS=1 and LSTMD_KAFKA_CLIENT=kafka-python (fast engine, every
other setting the daemon's default: at-least-once, pipelined checkpoint),
`lstmd-librdkafka` the same with LSTMD_KAFKA_CLIENT=confluent-kafka, `quix` one
process of the Quix peer (its defaults: at-least-once, commit every 5 s). The
contenders (`latency_contenders`, less the lstmd ones whose backend is not in
`versus_clients`) alternate within each round. The pacing starts only once
the contender has answered the warm-up event of every sequence (group join,
restore and model start-up are not latency).

An event's latency: the broker's append time of its prediction (the output topic
is LogAppendTime) minus its input record's create time (stamped by the
producer at send, on the same machine's clock), in milliseconds: input sent to
prediction durable, which covers the consumer's fetch wait, the processing, the
producer's linger and the broker's acknowledgement. Reported per contender: p50,
p99 and the maximum over the paced events of each round (`percentiles`), the
rows carrying the medians over the rounds; and, as in the versus section, CPU
seconds per million events at that rate and each worker's peak RSS.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from daemon.devtools.bench.broker import (
    BROKER,
    OUTPUT_TOPIC_CONFIG,
    EndOffsets,
    create_topics_for_bench,
    stream_value,
    unique,
)
from daemon.devtools.bench.config import MODELS, BenchConfig, Log, Row, versus_contenders
from daemon.devtools.bench.versus import LABELS, Contenders, Outcome, median


class LatencySection:
    """Each contender at the same steady rate, alternating within each round."""

    name = "latency"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        bootstrap = BROKER.bootstrap(config, log)
        contenders = Contenders(config, log)
        names = versus_contenders(config, config.latency_contenders)
        results: dict[str, list[Paced]] = {c: [] for c in names}
        for i in range(config.latency_rounds):
            for contender in names:
                log(
                    f"bench: latency round {i + 1}/{config.latency_rounds} {contender}: "
                    f"{config.latency_rate:,} events/s for {config.latency_seconds:.0f} s ..."
                )
                paced = self._round(bootstrap, config, contenders, contender)
                if paced.error:
                    log(f"bench: {paced.error}")
                results[contender].append(paced)
        return [latency_row(self.name, c, results[c], config) for c in names]

    def _round(self, bootstrap: str, config: BenchConfig, contenders: Contenders, contender: str) -> Paced:
        partitions, sequences = config.versus_partitions, config.versus_sequences
        features = MODELS[config.versus_model].features
        input_topic, output = unique("bench-lat-in"), unique(f"bench-lat-out-{contender}")
        create_topics_for_bench(bootstrap, {input_topic: partitions})
        create_topics_for_bench(bootstrap, {output: partitions}, OUTPUT_TOPIC_CONFIG)
        paced = int(config.latency_rate * config.latency_seconds)
        topics = (input_topic, output, partitions)
        pacer = _Pacer(bootstrap, topics, sequences, features, config.latency_rate, paced)
        pacer.start()
        outcome = contenders.run(
            contender, 1, bootstrap, input_topic, sequences + paced, config.latency_seconds + 180.0, output
        )
        pacer.stop()
        pacer.join()
        result = Paced(error=outcome.error or pacer.error, outcome=outcome)
        if result.error:
            return result
        result.latencies = _latencies(bootstrap, input_topic, outcome.output, partitions, pacer.paced_from_ms)
        if len(result.latencies) < paced:
            result.error = f"{contender}: {paced - len(result.latencies)} paced events without a prediction"
        return result


@dataclass
class Paced:
    """A contender's latency round: its latencies (ms), its run, what went wrong."""

    error: str = ""
    outcome: Outcome | None = None
    latencies: list[float] = field(default_factory=list)


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    """(p50, p99, max) of a round's latencies: NumPy's percentiles, linear between
    the closest ranks."""
    a = np.asarray(latencies, dtype=np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def latency_row(section: str, contender: str, rounds: list[Paced], config: BenchConfig) -> Row:
    """Medians over the rounds that completed of their p50, p99 and max, CPU and RSS."""
    done = [r for r in rounds if not r.error and r.outcome is not None]
    figures = [percentiles(r.latencies) for r in done]
    outcomes = [r.outcome for r in done if r.outcome is not None]
    return {
        "section": section,
        "model": config.versus_model,
        "engine": LABELS[contender],
        "requested": contender,
        "processes": 1,
        "sequences": config.versus_sequences,
        "events": int(statistics.median(len(r.latencies) for r in done)) if done else 0,
        "rounds": len(done),
        "events_per_s": float(config.latency_rate) if done else None,
        "latency_p50_ms": median([f[0] for f in figures]),
        "latency_p99_ms": median([f[1] for f in figures]),
        "latency_max_ms": median([f[2] for f in figures]),
        "cpu_s_per_million_events": median([o.cpu_s_per_million for o in outcomes]),
        "worker_peak_rss_mib": median([max(o.worker_peak_rss_mib, default=None) for o in outcomes]),
        "per_round": {
            "latency_p50_p99_max_ms": [list(f) for f in figures],
            "cpu_s_per_million_events": [o.cpu_s_per_million for o in outcomes],
            "worker_peak_rss_mib": [o.worker_peak_rss_mib for o in outcomes],
        },
        "note": "; ".join(
            [
                "per event, input created to prediction appended (broker-timed)",
                *sorted({r.error for r in rounds if r.error}),
            ]
        ),
    }


class _Pacer(threading.Thread):
    """Sends one warm-up event per sequence, waits until the contender has answered
    them all, then sends `events` more at `rate` per second (in 10 ms slices)."""

    def __init__(
        self,
        bootstrap: str,
        topics: tuple[str, str, int],
        sequences: int,
        features: int,
        rate: int,
        events: int,
    ) -> None:
        super().__init__(name="bench-pacer", daemon=True)
        self.bootstrap, (self.topic, self.output_topic, self.partitions) = bootstrap, topics
        self.sequences, self.features, self.rate, self.events = sequences, features, rate, events
        self.paced_from_ms = 0
        self.error = ""
        self._stopped = threading.Event()

    def stop(self) -> None:
        """The contender has stopped: stop waiting for its answers."""
        self._stopped.set()

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks=1, linger_ms=0)
        try:
            for seq in range(self.sequences):
                producer.send(
                    self.topic, key=f"s{seq:05d}".encode(), value=stream_value(seq, 0, self.features)
                )
            producer.flush(timeout=60)
            if not self._answered(timeout_s=120.0):
                self.error = "no warm-up prediction within 120 s"
                return
            self.paced_from_ms = int(time.time() * 1000)
            started = time.perf_counter()
            for i in range(self.events):
                due = started + i / self.rate
                wait = due - time.perf_counter()
                if wait > 0.01:
                    time.sleep(wait)
                seq = i % self.sequences
                step = 1 + i // self.sequences
                producer.send(
                    self.topic, key=f"s{seq:05d}".encode(), value=stream_value(seq, step, self.features)
                )
            producer.flush(timeout=60)
        finally:
            producer.close(timeout=10)

    def _answered(self, timeout_s: float) -> bool:
        """Whether every warm-up event has its prediction (False after the timeout or
        once the contender has stopped)."""
        with EndOffsets(self.bootstrap, self.output_topic, self.partitions) as outputs:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and not self._stopped.is_set():
                if outputs() >= self.sequences:
                    return True
                time.sleep(0.1)
            return False


def _latencies(
    bootstrap: str, input_topic: str, output_topic: str, partitions: int, from_ms: int
) -> list[float]:
    """Per paced input (create time >= from_ms): its prediction's append time minus
    its create time, in ms."""
    created = {(r.partition, r.offset): r.timestamp for r in _read(bootstrap, input_topic, partitions)}
    out = []
    for r in _read(bootstrap, output_topic, partitions):
        value: dict[str, Any] = orjson.loads(r.value)
        sent = created.get((value["partition"], value["offset"]))
        if sent is not None and sent >= from_ms:
            out.append(float(r.timestamp - sent))
    return out


def _read(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records: list[Any] = []
        deadline = time.monotonic() + 60
        while any((consumer.position(tp) or 0) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500, max_records=5000).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()
