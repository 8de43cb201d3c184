"""The end-to-end sections' Kafka side: the run's broker, its input stream, and
rates measured from the broker's append times.

The broker is the configured one or a LocalKafka started for the run; the input
stream is produced once per broker and shape and read by every contender (e2e,
peer, profile); output topics are LogAppendTime, so that a contender in another
process (the peer) is timed the same way as those in this one.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
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
        self.inputs: dict[tuple[str, int, int, int, int, int], str] = {}
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
        """(bootstrap, topic) of the e2e input stream, produced once per broker and shape."""
        return self.stream(config, log, config.e2e_events, config.e2e_sequences, config.e2e_partitions)

    def stream(
        self, config: BenchConfig, log: Log, events: int, sequences: int, partitions: int, features: int = 1
    ) -> tuple[str, str]:
        """(bootstrap, topic) of an input stream of this shape, produced once per broker."""
        bootstrap = self.bootstrap(config, log)
        key = (bootstrap, events, sequences, partitions, config.seed, features)
        if key not in self.inputs:
            topic = unique("bench-in")
            create_topics_for_bench(bootstrap, {topic: partitions})
            log(
                f"bench: producing {events:,} events of {sequences} sequences, {features} feature(s), "
                f"to {topic} ({partitions} partitions) ..."
            )
            produce_stream(bootstrap, topic, events, sequences, config.seed, features)
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


def stream_value(seq: int, step: int, features: int = 1) -> bytes:
    """The demo's record shape: a smooth per-sequence signal in [0, 1] per feature
    (feature j a phase of 1.3 j further; the first one is the demo's single feature)."""
    x = [round(0.5 + 0.4 * math.sin(0.26 * step + 0.7 * seq + 1.3 * j), 5) for j in range(features)]
    return orjson.dumps({"x": x})


def produce_stream(
    bootstrap: str, topic: str, events: int, sequences: int, seed: int, features: int = 1
) -> None:
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
            producer.send(
                topic, key=f"s{seq:05d}".encode(), value=stream_value(seq, i // sequences, features)
            )
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


Procs = dict[int, tuple[int, float]]
"""pid -> (parent pid, user + system CPU seconds so far), as /proc has them."""


def read_procs() -> Procs:
    """Every process's parent and CPU seconds, from Linux's /proc (empty where there is none)."""
    procs: Procs = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return procs
    for entry in entries:
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after the command: state, ppid, ..., utime (field 14), stime (field 15)
        procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return procs


def tree(procs: Procs, roots: Sequence[int]) -> set[int]:
    """The roots that exist and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(pid: int | Sequence[int], procs: Procs | None = None) -> float | None:
    """User + system CPU seconds used so far by processes and their descendants (a
    supervisor and its workers; several peer processes), from /proc; None if none of
    them is there."""
    procs = read_procs() if procs is None else procs
    members = tree(procs, [pid] if isinstance(pid, int) else pid)
    return sum(procs[p][1] for p in members) if members else None


def workers(procs: Procs, members: set[int]) -> set[int]:
    """The processes of a tree that do the work: those without children in it (a
    pod's supervisor is not one of them; a single process is its own worker)."""
    parents = {procs[p][0] for p in members}
    return {p for p in members if p not in parents}


def peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident memory (VmHWM in /proc/<pid>/status), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_s_per_million(first: tuple[int, float], last: tuple[int, float]) -> float | None:
    """CPU seconds per million events between two samples (events done, CPU seconds):
    the same number as CPU microseconds per event."""
    events, cpu = last[0] - first[0], last[1] - first[1]
    return cpu / events * 1e6 if events > 0 else None


@dataclass
class ProcessRun:
    """Contender processes run to a target: what went wrong ("" if nothing), their
    CPU (with their descendants') per output from their first output seen to the
    target, and each worker's peak resident memory just before they were stopped."""

    error: str = ""
    cpu_us_per_event: float | None = None  # = CPU seconds per million events
    worker_peak_rss_mib: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Launch:
    """One contender process: its command, where its output goes, its environment."""

    command: list[str]
    log_path: Path
    env: dict[str, str] | None = None


def run_until_outputs(
    command: list[str],
    log_path: Path,
    outputs: tuple[str, str, int],
    target: int,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> ProcessRun:
    """One contender process: see `run_all_until_outputs`."""
    return run_all_until_outputs([Launch(command, log_path, env)], outputs, target, timeout_s)


def run_all_until_outputs(
    launches: Sequence[Launch], outputs: tuple[str, str, int], target: int, timeout_s: float
) -> ProcessRun:
    """Run a contender's processes (the peer, or several peer processes in one group;
    lstmd as a pod runs it) until `target` records are in their output topic
    (`outputs`: bootstrap, topic, partitions), then stop them with SIGTERM. CPU per
    event is sampled between the first outputs seen and the target reached (start-up
    excluded: the per-core figure, whatever else the machine runs); the workers'
    peak RSS (VmHWM) just before the SIGTERM. Each one's output goes to its log_path."""
    run = ProcessRun()
    counted = EndOffsets(*outputs)
    first: tuple[int, float] | None = None
    procs: list[subprocess.Popen[bytes]] = []
    with counted, contextlib.ExitStack() as files:
        for launch in launches:
            out = files.enter_context(launch.log_path.open("wb"))
            procs.append(
                subprocess.Popen(
                    launch.command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=launch.env,
                )
            )
        pids = [p.pid for p in procs]
        deadline = time.monotonic() + timeout_s
        try:
            while (done := counted()) < target:
                if first is None and done and (cpu := tree_cpu_seconds(pids)) is not None:
                    first = (done, cpu)
                if (gone := next((p for p in procs if p.poll() is not None), None)) is not None:
                    log_path = launches[procs.index(gone)].log_path
                    tail = log_path.read_text(errors="replace")[-500:]
                    run.error = f"exited with code {gone.returncode}: {tail}"
                    break
                if time.monotonic() > deadline:
                    run.error = f"timed out after {timeout_s:.0f} s"
                    break
                time.sleep(0.2)
            else:
                table = read_procs()
                members = tree(table, pids)
                cpu = tree_cpu_seconds(pids, table)
                if first is not None and cpu is not None:
                    run.cpu_us_per_event = cpu_s_per_million(first, (done, cpu))
                run.worker_peak_rss_mib = sorted(
                    rss for p in workers(table, members) if (rss := peak_rss_mib(p)) is not None
                )
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return run
