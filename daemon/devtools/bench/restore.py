"""The `restore` section: states per second restored from a real state partition.

For each model of `BenchConfig.models`, `restore_states` open sequences (one
snapshot record each, `SequenceState.snapshot` of a state with random tensors of
the model's state shapes, keys `s<i>`) are written once with a producer to one
partition of a fresh compacted state topic on the run's broker (broker.py).
Then, in each of `scale_rounds` rounds, in turn:

* `raw read` (the baseline): a consumer made like the restorer's
  (the port's `reader()` of LSTMD_KAFKA_CLIENT: no group, read_committed) reads
  the partition from its beginning to the end it had, polling 5000 records at a
  time like the restorer, decoding nothing;
* `restorer`: the daemon's own `Restorer` on a fresh such consumer: `begin`,
  `step()` until the partition is complete, and `adopt` into an empty
  `StateStore` (timed from `begin` to the end of `adopt`; making the consumer
  is not timed, its first connection is).

A row per model and contender: states/s, seconds for all the states (medians
of the rounds), the ratio to the raw read of the same model, the record size,
and whether the issue's target (100 k states within `restore_target_s`) held.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from daemon.devtools.bench.broker import BROKER, create_topics_for_bench, unique
from daemon.devtools.bench.config import MODELS, BenchConfig, Log, Row
from daemon.devtools.bench.files import model_file

#: Issue 12's target: this many open sequences restored within `restore_target_s`.
TARGET_STATES = 100_000


def _settings(bootstrap: str, group: str, model_path: Any) -> Any:
    from daemon.config import Settings

    return Settings(
        kafka_bootstrap_servers=bootstrap,
        input_topic=f"{group}.in",
        output_topic=f"{group}.out",
        group_id=group,
        model_path=model_path,
        log_level="WARNING",
    )


def snapshots(shapes: list[tuple[int, ...]], model_id: str, count: int, seed: int) -> list[bytes]:
    """`count` snapshot records of open sequences (random tensors of `shapes`)."""
    from daemon.core.state import SequenceState

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        tensors = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        state = SequenceState(tensors=tensors, n=10 + i % 90, watermark=i, first_offset=i, last_step=None)
        out.append(state.snapshot(model_id))
    return out


def _write(bootstrap: str, topic: str, records: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        enable_idempotence=False,
        linger_ms=20,
        batch_size=1 << 20,
        max_request_size=8 << 20,
    )
    try:
        for i, value in enumerate(records):
            producer.send(topic, key=f"s{i:07d}".encode(), value=value, partition=0)
        producer.flush(timeout=300)
    finally:
        producer.close(timeout=30)


def raw_read(settings: Any) -> tuple[int, float]:
    """(records, seconds) of reading state partition 0 to its end, decoding nothing."""
    from daemon.kafka.backends import make_backend
    from daemon.kafka.port import TopicPartition

    consumer = make_backend(settings).reader()
    try:
        tp = TopicPartition(settings.state_topic, 0)
        started = time.perf_counter()
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp], timeout_ms=30_000)[tp]
        count = 0
        while (consumer.position(tp, timeout_ms=30_000) or 0) < end:
            for records in consumer.poll(100, max_records=5000).values():
                count += len(records)
        return count, time.perf_counter() - started
    finally:
        consumer.close(5000)


def restore_once(settings: Any, model_id: str, shapes: list[tuple[int, ...]]) -> tuple[int, float]:
    """(states installed, seconds) of `Restorer.begin` + `step()` until done + `adopt`."""
    from daemon.core.state import StateStore
    from daemon.kafka.backends import make_backend
    from daemon.ops.metrics import Metrics
    from daemon.streaming.restore import Restorer, adopt

    consumer = make_backend(settings).reader()
    try:
        restorer = Restorer(consumer, settings, Metrics())
        store = StateStore(0)
        started = time.perf_counter()
        restorer.begin([0])
        done: dict[int, Any] = {}
        while 0 not in done:
            done.update(restorer.step())
        evicted = adopt(store, model_id, 0, done[0], shapes)
        took = time.perf_counter() - started
        if evicted:
            raise RuntimeError(f"{len(evicted)} restored states were discarded")
        return len(store), took
    finally:
        consumer.close(5000)


class RestoreSection:
    """States per second through the daemon's Restorer (see the module docstring)."""

    name = "restore"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        from daemon.inference.model import load_model

        bootstrap = BROKER.bootstrap(config, log)
        rows: list[Row] = []
        for model_name in config.models:
            spec = MODELS[model_name]
            model = load_model(model_file(spec))
            shapes = [tuple(s) for s in model.state_shapes]
            model_id = str(model.identity)
            group = unique(f"bench-restore-{spec.name}")
            settings = _settings(bootstrap, group, model_file(spec))
            from daemon.kafka.topics import STATE_TOPIC_CONFIG

            create_topics_for_bench(bootstrap, {settings.state_topic: 1}, STATE_TOPIC_CONFIG)
            records = snapshots(shapes, model_id, config.restore_states, config.seed)
            record_bytes = statistics.median(len(r) for r in records)
            log(f"bench: restore {spec.name}: writing {len(records):,} snapshot records ...")
            _write(bootstrap, settings.state_topic, records)
            del records
            raw: list[tuple[int, float]] = []
            restored: list[tuple[int, float]] = []
            for i in range(config.scale_rounds):
                log(f"bench: restore {spec.name} round {i + 1}/{config.scale_rounds} ...")
                raw.append(raw_read(settings))
                restored.append(restore_once(settings, model_id, shapes))
            raw_rate = statistics.median(n / t for n, t in raw)
            for contender, results in (("raw read", raw), ("restorer", restored)):
                seconds = statistics.median(t for _, t in results)
                rate = statistics.median(n / t for n, t in results)
                count = int(statistics.median(n for n, _ in results))
                row: Row = {
                    "section": self.name,
                    "model": spec.name,
                    "engine": contender,
                    "requested": contender,
                    "states": count,
                    "rounds": len(results),
                    "states_per_s": rate,
                    "seconds": seconds,
                    "seconds_each": [t for _, t in results],
                    "vs_raw_read": rate / raw_rate if raw_rate else None,
                    "record_bytes": record_bytes,
                    "note": "",
                }
                if contender == "restorer":
                    # The count; another count is scaled to it linearly (said so).
                    projected = seconds * TARGET_STATES / max(1, count)
                    row["target"] = f"{TARGET_STATES:,} states within {config.restore_target_s:g} s" + (
                        "" if count == TARGET_STATES else f" (extrapolated from {count:,}: {projected:.1f} s)"
                    )
                    row["target_met"] = projected <= config.restore_target_s
                rows.append(row)
        return rows
