"""Partitions added while running, without a broker: the alignment of outputs
re-checked, a send for a partition the producer does not know yet, and the open
sequences a grown input topic moves (daemon/kafka/topics.py, delivery, run loop)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
import structlog
from kafka.cluster import ClusterMetadata
from kafka.errors import UnknownTopicOrPartitionError
from kafka.future import Future

from daemon.config import Settings
from daemon.core.records import OutputRecord, StateRecord
from daemon.kafka.topics import PARTITIONERS, Layout, known_layout, moved_sequences
from daemon.ops.metrics import Metrics
from daemon.streaming import housekeeping, layout
from daemon.streaming import loop as loop_module
from daemon.streaming.delivery import AtLeastOnce, Transactional, make_delivery
from daemon.streaming.delivery import producer as producer_module
from tests.fakes import make, output, settings
from tests.support.backends import Memory
from tests.support.kafka import MemoryProducer


class Cluster(ClusterMetadata):
    """kafka-python's metadata with partition counts set by hand; a refresh (request_update)
    brings `fresh`, as the broker's answer would."""

    def __init__(self, counts: dict[str, int], fresh: dict[str, int] | None = None) -> None:
        super().__init__()
        self.counts, self.fresh, self.refreshes = dict(counts), fresh, 0

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(self.counts[topic])) if topic in self.counts else None

    def request_update(self) -> Future:
        self.refreshes += 1
        if self.fresh is not None:
            self.counts.update(self.fresh)
        return Future().success(self)


class Producer:
    """kafka-python's send() refusals: an explicit partition its metadata does not list,
    and a record with neither key nor value."""

    def __init__(self, cluster: Cluster) -> None:
        self._metadata = cluster
        self.sent: list[tuple[str, int | None]] = []
        self.tracked: list[str] = []
        self._sender = SimpleNamespace(add_topic=self.tracked.append)

    def send(
        self, topic: str, partition: int | None = None, key: Any = None, value: Any = None, **_: Any
    ) -> Future:
        if key is None and value is None:
            raise ValueError("Need at least one: key or value")
        if partition is not None and partition not in (self._metadata.partitions_for_topic(topic) or ()):
            raise ValueError(f"Unrecognized partition {partition} for topic {topic}")
        self.sent.append((topic, partition))
        return Future().success(None)

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """The log events of delivery and the run loop during the test. Their module
    loggers are replaced: one used before (cache_logger_on_first_use) would
    otherwise keep writing past structlog's capture."""
    with structlog.testing.capture_logs() as captured:
        for module in (producer_module, loop_module, layout):
            monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
        yield captured


def checkpointer(tmp_path: Path, producer: Producer) -> AtLeastOnce | Transactional:
    cp = make_delivery(settings(tmp_path), lambda: producer, Metrics(), threading.Event())  # type: ignore[arg-type,return-value]
    cp.same_partitions = True
    return cp


def out(partition: int) -> OutputRecord:
    return dataclasses.replace(output(), partition=partition)


def counts(tmp_path: Path, inp: int, out: int, dlq: int, state: int) -> dict[str, int]:
    s = settings(tmp_path)
    return {s.input_topic: inp, s.output_topic: out, s.dlq_topic: dlq, s.state_topic: state}


# -- which keys a grown input topic moves ----------------------------------------------
def test_moved_sequences_counts_the_keys_each_default_partitioner_moves() -> None:
    """Hashes checked against the clients: murmur2(b"21") is Java's -973932308, and
    librdkafka placed 200 of 200 keys at crc32 % 6 on the real broker. From 3 to 6
    partitions, murmur2 puts a, c, d, f, g in another partition, crc32 a, b, c, g, h."""
    # Each key where murmur2 put it with 3 partitions (a: 1, b: 2, c: 1, d: 2, e: 2, f: 0, g: 0, h: 1).
    by_murmur2 = [(1, "a"), (2, "b"), (1, "c"), (2, "d"), (2, "e"), (0, "f"), (0, "g"), (1, "h")]
    # Of those, crc32 would have put only b where it is, and moves it.
    assert moved_sequences(by_murmur2, 3, 6) == {"murmur2": 5, "crc32": 1}
    # Where crc32 put them (a: 0, b: 2, c: 0, d: 0, e: 0, f: 2, g: 1, h: 0).
    by_crc32 = [(0, "a"), (2, "b"), (0, "c"), (0, "d"), (0, "e"), (2, "f"), (1, "g"), (0, "h")]
    # Of those, murmur2 would have put only b where it is, and keeps it there.
    assert moved_sequences(by_crc32, 3, 6) == {"murmur2": 0, "crc32": 5}
    assert moved_sequences(by_murmur2, 3, 3) == {"murmur2": 0, "crc32": 0}


# -- the layout the producer's metadata shows ----------------------------------------------
def test_layout_alignment_and_input_partitions_without_state() -> None:
    assert Layout(6, 6, 6, 6).aligned and not Layout(6, 6, 6, 6).stateless
    assert not Layout(6, 3, 6, 6).aligned and not Layout(6, 6, 3, 6).aligned
    assert list(Layout(6, 6, 6, 4).stateless) == [4, 5]
    assert not Layout(3, 3, 3, 6).stateless  # the state topic grown first: fine


def test_known_layout_reads_the_producers_metadata_and_tracks_a_topic_it_lacks(tmp_path: Path) -> None:
    s = settings(tmp_path)
    full = counts(tmp_path, 6, 3, 3, 6)
    assert known_layout(Producer(Cluster(full)), s) == Layout(6, 3, 3, 6)  # type: ignore[arg-type]
    fresh = Producer(Cluster({k: v for k, v in full.items() if k != s.dlq_topic}))
    assert known_layout(fresh, s) is None  # type: ignore[arg-type]
    assert fresh.tracked == [s.dlq_topic]  # known from the next refresh on
    assert known_layout(SimpleNamespace(), s) is None  # type: ignore[arg-type]  # not kafka-python's


# -- a send for a partition the producer does not know yet -----------------------------
def test_an_output_for_a_partition_added_since_the_last_refresh_goes_there(tmp_path: Path) -> None:
    s = settings(tmp_path)
    cluster = Cluster(counts(tmp_path, 3, 3, 3, 3), fresh=counts(tmp_path, 6, 6, 6, 6))
    producer = Producer(cluster)
    cp = checkpointer(tmp_path, producer)
    cp.send([out(5)])
    assert producer.sent == [(s.output_topic, 5)] and cluster.refreshes == 1
    assert cp.same_partitions and not cp.failing()


def test_an_output_for_a_partition_the_output_topic_lacks_goes_by_key_from_then_on(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    s = settings(tmp_path)
    cluster = Cluster(counts(tmp_path, 3, 3, 3, 3), fresh=counts(tmp_path, 6, 3, 3, 6))
    producer = Producer(cluster)
    cp = checkpointer(tmp_path, producer)
    cp.send([out(5), out(4)])
    assert producer.sent == [(s.output_topic, None), (s.output_topic, None)]
    assert not cp.same_partitions and cluster.refreshes == 1 and not cp.failing()
    assert [e["event"] for e in logs] == ["outputs_by_key"]


def test_a_state_record_for_a_partition_the_state_topic_lacks_fails_and_is_retried(
    tmp_path: Path,
) -> None:
    s = settings(tmp_path)
    producer = Producer(Cluster(counts(tmp_path, 6, 6, 6, 3)))
    cp = checkpointer(tmp_path, producer)
    sent = cp.out.send([StateRecord(5, "k", b"state"), StateRecord(1, "j", b"state")])
    assert isinstance(sent[0][1].exception, UnknownTopicOrPartitionError)
    assert not sent[1][1].succeeded()  # failed with it, both resent after the backoff
    assert producer.sent == []
    assert s.state_topic in str(sent[0][1].exception)


def test_another_value_error_of_send_is_not_taken_for_a_new_partition(tmp_path: Path) -> None:
    cluster = Cluster(counts(tmp_path, 3, 3, 3, 3))
    cp = checkpointer(tmp_path, Producer(cluster))
    with pytest.raises(ValueError, match="Need at least one"):
        cp.out.send_to(settings(tmp_path).output_topic, 1, key=None, value=None)
    assert cluster.refreshes == 0


# -- the run loop's watch over the topics, on the in-memory Kafka -------------------
def grown(kafka: Memory, s: Settings, **counts: int) -> None:
    """Partitions added to the named topics ("input", "output", "dlq", "state")."""
    topics = {
        "input": s.input_topic,
        "output": s.output_topic,
        "dlq": s.dlq_topic,
        "state": s.state_topic,
    }
    for name, total in counts.items():
        kafka.kafka.add_partitions(topics[name], total)


def answered_on(kafka: Memory, s: Settings, key: str) -> list[int]:
    """The output partitions of the predictions for `key`, in order."""
    records = sorted(kafka.kafka.records(s.output_topic), key=lambda r: r.timestamp)  # in send order
    return [r.partition for r in records if r.key == key.encode()]


def test_the_run_loop_realigns_outputs_and_announces_the_moved_sequences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    monkeypatch.setattr(housekeeping, "HOUSEKEEPING_INTERVAL_S", 0.0)
    kafka = Memory()
    s = kafka.settings(tmp_path, partitions=3)
    one = orjson.dumps({"x": [1]})
    # Open sequences (murmur2 moves a, d and f from 3 partitions to 6), and one ended.
    kafka.produce(s.input_topic, [(b"a", one, 1), (b"b", one, 2), (b"d", one, 2), (b"f", one, 0)])
    kafka.produce(s.input_topic, [(b"h", orjson.dumps({"x": [1], "end": True}), 1)])
    proc, metrics = make()
    loop = kafka.loop(s, proc, metrics)
    kafka.run_until([loop], lambda: len(kafka.kafka.records(s.output_topic)) == 5)
    assert answered_on(kafka, s, "a") == [1]  # by input partition: aligned
    logs.clear()
    grown(kafka, s, state=6)  # the state topic grew first: nothing to say
    loop.step()
    assert not [e for e in logs if e["event"] in ("input_partitions_added", "outputs_partitioning")]
    grown(kafka, s, input=6)  # then the input: outputs go by key, moves announced
    loop.step()  # seen at its next housekeeping
    by_key = murmur2_partition(b"a", 3)
    assert by_key != 0
    kafka.produce(s.input_topic, [(b"a", one, 0)])  # a probe whose key hashes elsewhere
    kafka.run_until([loop], lambda: len(answered_on(kafka, s, "a")) == 2)
    assert answered_on(kafka, s, "a") == [1, by_key]
    grown(kafka, s, output=6, dlq=6)  # then the output topics: aligned again
    loop.step()
    kafka.produce(s.input_topic, [(b"a", one, 0)])
    kafka.run_until([loop], lambda: len(answered_on(kafka, s, "a")) == 3)
    assert answered_on(kafka, s, "a") == [1, by_key, 0]
    added = [e for e in logs if e["event"] == "input_partitions_added"]
    assert [(e["from"], e["to"], e["open_sequences"], e["moved_murmur2"]) for e in added] == [(3, 6, 4, 3)]
    assert metrics.registry.get_sample_value("lstmd_moved_sequences_total", {"partitioner": "murmur2"}) == 3


def test_an_input_partition_without_a_state_partition_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[MutableMapping[str, Any]]
) -> None:
    monkeypatch.setattr(housekeeping, "HOUSEKEEPING_INTERVAL_S", 0.0)
    kafka = Memory()
    s = kafka.settings(tmp_path, partitions=6)
    kafka.kafka.topics[s.state_topic] = kafka.kafka.topics[s.state_topic][:3]  # created smaller
    one = orjson.dumps({"x": [1]})
    kafka.produce(s.input_topic, [(b"a", one, 2), (b"b", one, 4)])
    proc, metrics = make()
    loop = kafka.loop(s, proc, metrics)
    kafka.run_until([loop], lambda: answered_on(kafka, s, "a") == [2])
    for _ in range(3):
        loop.step()
    assert answered_on(kafka, s, "b") == []  # partition 4 waits for its state partition
    watched = ("state_partitions_missing", "partition_waiting_for_state")
    assert [e["event"] for e in logs if e["event"] in watched] == [
        "state_partitions_missing",
        "partition_waiting_for_state",
        "partition_waiting_for_state",
        "partition_waiting_for_state",
    ]
    assert next(e["waiting"] for e in logs if e["event"] == "state_partitions_missing") == [3, 4, 5]
    producer = cast(MemoryProducer, loop.clients.delivery.producer)
    assert producer._metadata.updates == 3  # asked once for each partition, when it began to wait
    grown(kafka, s, state=6)  # the state topic grew
    kafka.run_until([loop], lambda: answered_on(kafka, s, "b") == [4])


def murmur2_partition(key: bytes, partitions: int) -> int:
    return PARTITIONERS["murmur2"](key) % partitions
