"""The `latency` section: how long an event takes through lstmd at a steady rate.

Throughput sections push a backlog through as fast as they can; a production
stream arrives at a rate, and what its users see is each event's delay. Here a
producer paces `latency_rate` events per second (the demo model's shape,
`e2e_sequences` interleaved sequences) for `latency_seconds` into a fresh input
topic, while lstmd's run loop (fast engine, every other setting the daemon's
default: at-least-once, pipelined, checkpoint every second) serves it
in-process. The pacing starts only once lstmd has answered a warm-up event per
sequence (group join, restore and model start-up are not latency).

An event's latency: the broker's append time of its prediction (the output topic
is LogAppendTime) minus its input record's create time (stamped by the
producer at send, on the same machine's clock), in milliseconds: input sent to
prediction durable, which covers the consumer's fetch wait, the processing, the
producer's linger and the broker's acknowledgement. Reported: p50, p99 and the
maximum over the paced events, per round; the row carries the medians.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import numpy as np
import orjson

from daemon.devtools.bench.broker import (
    BROKER,
    OUTPUT_TOPIC_CONFIG,
    create_topics_for_bench,
    stream_value,
    unique,
)
from daemon.devtools.bench.config import E2E_MODEL, MODELS, BenchConfig, Log, Row
from daemon.devtools.bench.e2e import run_lstmd
from daemon.devtools.bench.files import model_file


class LatencySection:
    name = "latency"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        bootstrap = BROKER.bootstrap(config, log)
        rounds: list[tuple[float, float, float, int]] = []
        errors: list[str] = []
        for i in range(config.latency_rounds):
            log(
                f"bench: latency round {i + 1}/{config.latency_rounds}: {config.latency_rate:,} events/s "
                f"for {config.latency_seconds:.0f} s ..."
            )
            result = self._round(bootstrap, config)
            if isinstance(result, str):
                errors.append(result)
            else:
                rounds.append(result)
        return [
            {
                "section": self.name,
                "model": E2E_MODEL,
                "engine": "fast",
                "requested": "fast",
                "sequences": config.e2e_sequences,
                "events": int(statistics.median(r[3] for r in rounds)) if rounds else 0,
                "rounds": len(rounds),
                "events_per_s": float(config.latency_rate) if rounds else 0.0,
                "latency_p50_ms": statistics.median(r[0] for r in rounds) if rounds else None,
                "latency_p99_ms": statistics.median(r[1] for r in rounds) if rounds else None,
                "latency_max_ms": statistics.median(r[2] for r in rounds) if rounds else None,
                "note": "; ".join(
                    [
                        "p50/p99 = per event, input sent to prediction appended, max "
                        + (f"{statistics.median(r[2] for r in rounds):.0f} ms" if rounds else "-"),
                        *sorted(set(errors)),
                    ]
                ),
            }
        ]

    def _round(self, bootstrap: str, config: BenchConfig) -> tuple[float, float, float, int] | str:
        from daemon.config import Settings

        partitions, sequences = config.e2e_partitions, config.e2e_sequences
        input_topic, output_topic = unique("bench-lat-in"), unique("bench-lat-out")
        create_topics_for_bench(bootstrap, {input_topic: partitions})
        create_topics_for_bench(bootstrap, {output_topic: partitions}, OUTPUT_TOPIC_CONFIG)
        settings = Settings(
            kafka_bootstrap_servers=bootstrap,
            input_topic=input_topic,
            output_topic=output_topic,
            group_id=unique("bench-lat"),
            model_path=model_file(MODELS[E2E_MODEL]),
            engine="fast",
            create_topics=True,
            dlq_topic=f"{output_topic}.dlq",
            log_level="WARNING",
        )
        paced = int(config.latency_rate * config.latency_seconds)
        pacer = _Pacer(bootstrap, input_topic, output_topic, sequences, config.latency_rate, paced)
        pacer.start()
        round_, _ = run_lstmd(settings, sequences + paced, timeout_s=config.latency_seconds + 120.0)
        pacer.join()
        if round_.error or pacer.error:
            return round_.error or pacer.error
        latencies = _latencies(bootstrap, input_topic, output_topic, partitions, pacer.paced_from_ms)
        if len(latencies) < paced:
            return f"{paced - len(latencies)} paced events without a prediction"
        a = np.asarray(latencies, dtype=np.float64)
        return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max()), len(latencies)


class _Pacer(threading.Thread):
    """Sends one warm-up event per sequence, waits for lstmd to answer one, then
    sends `events` more at `rate` per second (in 10 ms slices)."""

    def __init__(
        self, bootstrap: str, topic: str, output_topic: str, sequences: int, rate: int, events: int
    ) -> None:
        super().__init__(name="bench-pacer", daemon=True)
        self.bootstrap, self.topic, self.output_topic = bootstrap, topic, output_topic
        self.sequences, self.rate, self.events = sequences, rate, events
        self.paced_from_ms = 0
        self.error = ""

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks=1, linger_ms=0)
        try:
            for seq in range(self.sequences):
                producer.send(self.topic, key=f"s{seq:05d}".encode(), value=stream_value(seq, 0))
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
                producer.send(self.topic, key=f"s{seq:05d}".encode(), value=stream_value(seq, step))
            producer.flush(timeout=60)
        finally:
            producer.close(timeout=10)

    def _answered(self, timeout_s: float) -> bool:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            self.output_topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest"
        )
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if consumer.poll(timeout_ms=200):
                    return True
            return False
        finally:
            consumer.close()


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
