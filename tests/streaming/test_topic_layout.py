"""Partitions added while running, without a broker: the alignment of outputs
re-checked, a send for a partition the producer does not know yet, and the open
sequences a grown input topic moves (daemon/kafka/topics.py, delivery, run loop)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
import structlog
from kafka.errors import UnknownTopicOrPartitionError

from daemon.config import Settings
from daemon.core.records import OutputRecord, StateRecord
from daemon.kafka.topics import PARTITIONERS, Layout, known_layout, moved_sequences
from daemon.streaming import housekeeping, layout
from daemon.streaming import loop as loop_module
from daemon.streaming.delivery import AtLeastOnce, Transactional
from daemon.streaming.delivery import producer as producer_module
from tests.support.backends import Memory, memory_delivery, ported_producer, unported_producer
from tests.support.fakes import make, output, settings
from tests.support.kafka import MemoryKafka


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """The log events of delivery and the run loop during the test. Their module
    loggers are replaced: one used before (cache_logger_on_first_use) would
    otherwise keep writing past structlog's capture."""
    with structlog.testing.capture_logs() as captured:
        for module in (producer_module, loop_module, layout):
            monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
        yield captured


def delivery(kafka: MemoryKafka, s: Settings) -> AtLeastOnce | Transactional:
    """At-least-once delivery with outputs going to their input's partition number."""
    cp = memory_delivery(kafka, s)
    cp.same_partitions = True
    return cp


def out(partition: int) -> OutputRecord:
    return dataclasses.replace(output(), partition=partition)


def cluster(tmp_path: Path, inp: int, out: int, dlq: int, state: int) -> tuple[MemoryKafka, Settings]:
    """The four topics with these partition counts; producers see partitions added
    later only when they refresh their metadata."""
    s = settings(tmp_path)
    kafka = MemoryKafka()
    kafka.stale_metadata = True
    counts = {s.input_topic: inp, s.output_topic: out, s.dlq_topic: dlq, s.state_topic: state}
    for topic, partitions in counts.items():
        if partitions:
            kafka.create_topic(topic, partitions)
    return kafka, s


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
    kafka, s = cluster(tmp_path, 6, 3, 3, 6)
    assert known_layout(ported_producer(kafka.producer()), s) == Layout(6, 3, 3, 6)
    kafka, s = cluster(tmp_path, 6, 3, 0, 6)  # no dead-letter topic in its metadata yet
    fresh = kafka.producer()
    assert known_layout(ported_producer(fresh), s) is None
    assert fresh.tracked == [s.dlq_topic]  # known from the next refresh on
    no_metadata = SimpleNamespace(send=print)  # not kafka-python's producer
    assert known_layout(ported_producer(cast(Any, no_metadata)), s) is None


# -- a send for a partition the producer does not know yet -----------------------------
def test_an_output_for_a_partition_added_since_the_last_refresh_goes_there(tmp_path: Path) -> None:
    kafka, s = cluster(tmp_path, 3, 3, 3, 3)
    cp = delivery(kafka, s)
    grown(kafka, s, input=6, output=6, dlq=6, state=6)
    cp.send([out(5)])
    assert [r.partition for r in kafka.records(s.output_topic)] == [5]
    assert kafka.producers[0].metadata_updates == 1
    assert cp.same_partitions and not cp.failing()


def test_an_output_for_a_partition_the_output_topic_lacks_goes_by_key_from_then_on(
    tmp_path: Path, logs: list[MutableMapping[str, Any]]
) -> None:
    kafka, s = cluster(tmp_path, 3, 3, 3, 3)
    cp = delivery(kafka, s)
    grown(kafka, s, input=6, state=6)
    cp.send([out(5), out(4)])
    by_key = murmur2_partition(b"k", 3)
    assert [r.partition for r in kafka.records(s.output_topic)] == [by_key, by_key]
    assert not cp.same_partitions and kafka.producers[0].metadata_updates == 1 and not cp.failing()
    assert [e["event"] for e in logs] == ["outputs_by_key"]


def test_a_state_record_for_a_partition_the_state_topic_lacks_fails_and_is_retried(
    tmp_path: Path,
) -> None:
    kafka, s = cluster(tmp_path, 6, 6, 6, 3)
    cp = delivery(kafka, s)
    sent = cp.out.send([StateRecord(5, "k", b"state"), StateRecord(1, "j", b"state")])
    assert isinstance(sent[0][1].exception, UnknownTopicOrPartitionError)
    assert not sent[1][1].succeeded()  # failed with it, both resent after the backoff
    assert kafka.producers[0].sent == [] and kafka.records(s.state_topic) == []
    assert s.state_topic in str(sent[0][1].exception)


def test_another_value_error_of_send_is_not_taken_for_a_new_partition(tmp_path: Path) -> None:
    kafka, s = cluster(tmp_path, 3, 3, 3, 3)
    cp = delivery(kafka, s)
    with pytest.raises(ValueError, match="Need at least one"):
        cp.out.send_to(s.output_topic, 1, key=None, value=None)
    assert kafka.producers[0].metadata_updates == 0


# -- the run loop's watch over the topics, on the in-memory Kafka -------------------
def grown(kafka: MemoryKafka, s: Settings, **counts: int) -> None:
    """Partitions added to the named topics ("input", "output", "dlq", "state")."""
    topics = {
        "input": s.input_topic,
        "output": s.output_topic,
        "dlq": s.dlq_topic,
        "state": s.state_topic,
    }
    for name, total in counts.items():
        kafka.add_partitions(topics[name], total)


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
    grown(kafka.kafka, s, state=6)  # the state topic grew first: nothing to say
    loop.step()
    assert not [e for e in logs if e["event"] in ("input_partitions_added", "outputs_partitioning")]
    grown(kafka.kafka, s, input=6)  # then the input: outputs go by key, moves announced
    loop.step()  # seen at its next housekeeping
    by_key = murmur2_partition(b"a", 3)
    assert by_key != 0
    kafka.produce(s.input_topic, [(b"a", one, 0)])  # a probe whose key hashes elsewhere
    kafka.run_until([loop], lambda: len(answered_on(kafka, s, "a")) == 2)
    assert answered_on(kafka, s, "a") == [1, by_key]
    grown(kafka.kafka, s, output=6, dlq=6)  # then the output topics: aligned again
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
    producer = unported_producer(loop.clients.delivery.producer)
    assert producer.metadata_updates == 3  # asked once for each partition, when it began to wait
    grown(kafka.kafka, s, state=6)  # the state topic grew
    kafka.run_until([loop], lambda: answered_on(kafka, s, "b") == [4])


def murmur2_partition(key: bytes, partitions: int) -> int:
    return PARTITIONERS["murmur2"](key) % partitions
