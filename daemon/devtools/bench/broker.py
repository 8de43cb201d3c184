"""The end-to-end sections' Kafka side: the run's broker, its input stream, and
rates measured from the broker's append times.

The broker is the configured one or a LocalKafka started for the run; the input
stream is produced once per broker and shape and read by every contender (e2e,
peer, profile); output topics are LogAppendTime, so that a contender in another
process (the peer) is timed the same way as those in this one.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from daemon.devtools.bench.config import BenchConfig, Log

# Output topics stamp records with the broker's append time: the peer, which runs
# in another process, is timed from them, and every other contender is cross-checked.
OUTPUT_TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}


class Broker:
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
            # Kafka's default initial rebalance delay (the tests' broker has 0): a new
            # group waits 3 s for more members, as on a production broker, so a pod's
            # workers, which join together, share the partitions from the start instead
            # of the first joiner taking all of a 20,000-event stream before the
            # rebalance. Every contender's first join waits it, outside every timing.
            self.local = LocalKafka(properties={"group.initial.rebalance.delay.ms": "3000"}).start()
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
            topic = unique("bench-in")
            create_topics_for_bench(bootstrap, {topic: config.e2e_partitions})
            log(
                f"bench: producing {config.e2e_events:,} events of {config.e2e_sequences} sequences "
                f"to {topic} ({config.e2e_partitions} partitions) ..."
            )
            produce_stream(bootstrap, topic, config.e2e_events, config.e2e_sequences, config.seed)
            self.inputs[key] = topic
        return bootstrap, self.inputs[key]


BROKER = Broker()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics_for_bench(
    bootstrap: str, topics: dict[str, int], config: dict[str, str] | None = None
) -> None:
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
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks=1, enable_idempotence=False, linger_ms=20, batch_size=512 << 10
    )
    try:
        for i in range(events):
            seq = (i + offset) % sequences
            producer.send(topic, key=f"s{seq:05d}".encode(), value=stream_value(seq, i // sequences))
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=30)


def broker_rate(
    bootstrap: str, topic: str, partitions: int, timeout_s: float = 30.0
) -> tuple[int, float | None]:
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


class EndOffsets:
    """The number of records in a topic, asked of the broker (no group, no fetch)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]

    def __call__(self) -> int:
        return sum(self.consumer.end_offsets(self.tps).values())

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> EndOffsets:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by a process and its descendants (the
    supervisor and its workers), from Linux's /proc; None where there is none."""
    procs: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after the command: state, ppid, ..., utime (field 14), stime (field 15)
        procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if pid not in procs:
        return None
    total, tree = 0.0, {pid}
    for p in sorted(procs):  # children have higher pids than their parents, nearly always
        if p in tree or procs[p][0] in tree:
            tree.add(p)
            total += procs[p][1]
    return total


@dataclass
class ProcessRun:
    """A contender in its own process: what went wrong ("" if nothing), and its CPU
    (with its descendants') per output from its first output seen to the target."""

    error: str = ""
    cpu_us_per_event: float | None = None


def run_until_outputs(
    command: list[str],
    log_path: Path,
    outputs: tuple[str, str, int],
    target: int,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> ProcessRun:
    """Run a contender in its own process (the peer, lstmd as a pod runs it) until
    `target` records are in its output topic (`outputs`: bootstrap, topic,
    partitions), then stop it with SIGTERM. CPU per event is sampled between the
    first outputs seen and the target reached (start-up excluded: the per-core
    figure, whatever else the machine runs). Its output goes to `log_path`."""
    run = ProcessRun()
    counted = EndOffsets(*outputs)
    first: tuple[int, float | None] | None = None
    with counted, log_path.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + timeout_s
        try:
            while (done := counted()) < target:
                if first is None and done:
                    first = (done, tree_cpu_seconds(proc.pid))
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-500:]
                    run.error = f"exited with code {proc.returncode}: {tail}"
                    break
                if time.monotonic() > deadline:
                    run.error = f"timed out after {timeout_s:.0f} s"
                    break
                time.sleep(0.2)
            else:
                cpu = tree_cpu_seconds(proc.pid)
                if first is not None and first[1] is not None and cpu is not None and done > first[0]:
                    run.cpu_us_per_event = (cpu - first[1]) / (done - first[0]) * 1e6
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return run
