"""The `compression` section: what each codec of LSTMD_KAFKA_COMPRESSION costs the
daemon's producer and saves on the wire, for the daemon's own output records.

Not in the default run (`--sections compression`). The records are predictions of
the demo model as the daemon encodes them (`codec.encode_prediction`, float32
outputs, `compression_sequences` interleaved keys), `compression_events` per codec
and round, produced to a fresh topic by a producer configured as the daemon's
(acks=all, idempotent, its linger and batch size: daemon/kafka/clients.py) with
only the codec changed. In each of `compression_rounds` rounds the codecs take
turns; a row per codec gives the medians over the rounds of:

* records_per_s: sends and the final flush (every acknowledgement), wall time;
* cpu_us_per_record: this process's CPU (the caller and the producer's IO thread,
  which compresses) over the same span;
* wire_bytes_per_record: the topic's size on the broker (DescribeLogDirs) over the
  records: the batches as sent, compressed, with their headers;

and vs_none, each over the uncompressed row's of the same run. The producer's
connection and the topic's metadata are set up before the timing starts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any, get_args

import numpy as np

from daemon.config import Compression
from daemon.core import codec
from daemon.devtools.bench.broker import BROKER, create_topics_for_bench, unique
from daemon.devtools.bench.config import E2E_MODEL, BenchConfig, Log, Row, aligned

CODECS: tuple[Compression, ...] = get_args(Compression)
# The demo model's identity as the daemon writes it (name and content hash).
MODEL_ID = "demo@3f9a1c2b7d4e"


def prediction_records(events: int, sequences: int, seed: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of `events` predictions as the daemon writes them: sequence i %
    `sequences` at its step i // `sequences`, a float32 output, the wall clock."""
    rng = np.random.default_rng(seed)
    ys = rng.random(events, dtype=np.float32).tolist()  # float32 as the engines return it
    now = time.time()
    out = []
    for i, y in enumerate(ys):
        seq = f"s{i % sequences:05d}"
        value = codec.encode_prediction(
            seq=seq,
            y=[y],
            n=i // sequences + 1,
            end=False,
            partition=i % 4,
            offset=i // 4,
            model=MODEL_ID,
            ts=now + i * 1e-4,
        )
        out.append((seq.encode(), value))
    return out


def topic_bytes(bootstrap: str, topic: str) -> int:
    """The topic's size in the broker's log directories (every partition, replica 1)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        total = 0
        for broker in admin.describe_log_dirs():
            for log_dir in broker["log_dirs"]:
                for t in log_dir["topics"]:
                    if t["name"] == topic:
                        total += sum(p["partition_size"] for p in t["partitions"])
        return total
    finally:
        admin.close()


def produce_once(
    bootstrap: str, codec_name: Compression, records: Sequence[tuple[bytes, bytes]]
) -> dict[str, float]:
    """One timed production of `records` to a fresh topic with `codec_name`."""
    from kafka import KafkaProducer

    from daemon.kafka.clients import PRODUCER_BATCH_BYTES, PRODUCER_LINGER_MS

    topic = unique(f"bench-codec-{codec_name}")
    create_topics_for_bench(bootstrap, {topic: 4})
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=PRODUCER_LINGER_MS,
        batch_size=PRODUCER_BATCH_BYTES,
        compression_type=None if codec_name == "none" else codec_name,  # as clients.compression_type
    )
    try:
        producer.partitions_for(topic)  # metadata before the clock starts
        wall, cpu = time.perf_counter(), time.process_time()
        for key, value in records:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=120)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        producer.close(timeout=30)
    n = len(records)
    return {
        "records_per_s": n / wall,
        "cpu_us_per_record": cpu / n * 1e6,
        "wire_bytes_per_record": topic_bytes(bootstrap, topic) / n,
    }


class CompressionSection:
    """Each codec of the daemon's producer on its output records (module docstring)."""

    name = "compression"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        bootstrap = BROKER.bootstrap(config, log)
        records = prediction_records(config.compression_events, config.compression_sequences, config.seed)
        raw = sum(len(k) + len(v) for k, v in records) / len(records)
        produce_once(bootstrap, "none", records[:1000])  # warm-up: imports, first connection
        runs: dict[str, list[dict[str, float]]] = {c: [] for c in CODECS}
        for i in range(config.compression_rounds):
            log(f"bench: compression round {i + 1}/{config.compression_rounds} ({', '.join(CODECS)}) ...")
            for name in CODECS:
                runs[name].append(produce_once(bootstrap, name, records))
        medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        base = medians["none"]
        rows: list[Row] = []
        for codec_name, m in medians.items():
            row: Row = {
                "section": self.name,
                "model": E2E_MODEL,
                "engine": codec_name,
                "requested": codec_name,
                "events": len(records),
                "rounds": config.compression_rounds,
                "record_bytes": raw,
                **m,
                "vs_none": m["records_per_s"] / base["records_per_s"],
                "cpu_vs_none": m["cpu_us_per_record"] / base["cpu_us_per_record"],
                "wire_vs_none": m["wire_bytes_per_record"] / base["wire_bytes_per_record"],
                "each": runs[codec_name],
                "note": "",
            }
            rows.append(row)
        return rows


def format_compression(rows: Sequence[Row]) -> list[str]:
    """The section's lines of the text table (none if it did not run)."""
    rows = [r for r in rows if r["section"] == "compression"]
    if not rows:
        return []
    lines: list[tuple[str, ...]] = [
        ("codec", "records/s", "vs none", "CPU us/rec", "vs none", "wire B/rec", "vs none")
    ]
    for r in rows:
        lines.append(
            (
                r["engine"],
                f"{r['records_per_s']:,.0f}",
                f"{r['vs_none']:.2f}",
                f"{r['cpu_us_per_record']:.1f}",
                f"{r['cpu_vs_none']:.2f}",
                f"{r['wire_bytes_per_record']:.1f}",
                f"{r['wire_vs_none']:.2f}",
            )
        )
    first: Any = rows[0]
    return [
        "",
        *aligned(lines),
        f"compression: the daemon's producer, {first['events']:,} predictions of "
        f"{first['record_bytes']:.0f} B (key + value) per codec and round, medians of "
        f"{first['rounds']} rounds; CPU = this process (sends and the producer's IO thread); "
        "wire = the topic's size on the broker per record",
    ]
