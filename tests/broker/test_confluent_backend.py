"""The confluent-kafka backend of the Kafka client port against the real broker: each
role (group consumer, reader, producer) doing what the port promises, with exact values."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings
from daemon.devtools.localkafka import LocalKafka
from daemon.kafka.backends.confluent import ConfluentBackend, ConfluentProducer
from daemon.kafka.port import GroupConsumer, Polled, Reader, RebalanceEvents, RecordProducer, TopicPartition
from tests.conftest import TopicFactory

pytestmark = pytest.mark.kafka

NO_ABANDON = threading.Event()


def _settings(tmp_path: Path, bootstrap: str, group: str, **extra: Any) -> Settings:
    model = tmp_path / "m.keras"
    model.write_bytes(b"x")
    return Settings(
        kafka_bootstrap_servers=bootstrap,
        input_topic="in",
        output_topic="out",
        group_id=group,
        model_path=model,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=2000,
        **extra,
    )


@pytest.fixture
def backend(kafka: LocalKafka, tmp_path: Path, request: pytest.FixtureRequest) -> ConfluentBackend:
    return ConfluentBackend(_settings(tmp_path, kafka.bootstrap, f"g-{request.node.name}-{time.time_ns()}"))


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Close every client a test opened, whatever it asserted."""
    opened: list[Any] = []

    def track(client: Any) -> Any:
        opened.append(client)
        return client

    yield track
    for client in opened:
        if isinstance(client, ConfluentProducer):
            client.close(1.0)
        else:
            client.close(5000)


def _until(what: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.01)


def _read(client: Reader, count: int, timeout_s: float = 20.0) -> list[Any]:
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        polled: Polled = client.poll(200)
        for batch in polled.values():
            records.extend(batch)
    return records


def _joined(consumer: GroupConsumer, events: RebalanceEvents) -> set[TopicPartition]:
    """Poll until the group assigned something; what it assigned."""
    assigned: set[TopicPartition] = set()
    deadline = time.monotonic() + 20
    while not assigned and time.monotonic() < deadline:
        consumer.poll(100)
        assigned = events.take()[0]
    assert assigned
    return assigned


def _produce(producer: RecordProducer, topic: str, partition: int, n: int, prefix: bytes = b"v") -> None:
    for i in range(n):
        producer.send(topic, partition=partition, key=b"k%d" % i, value=prefix + b"%d" % i)
    producer.flush(10)


def test_round_trip_with_headers_and_null_key_and_futures_done_without_a_call(
    backend: ConfluentBackend, topics: TopicFactory, closing: Callable[[Any], Any]
) -> None:
    t = topics({"in": 1})["in"]
    producer: RecordProducer = closing(backend.producer(None))
    futures = [
        producer.send(t, partition=0, key=b"a", value=b"1", headers=[("h", b"x"), ("h2", b"")]),
        producer.send(t, partition=None, key=None, value=b"2"),
        producer.send(t, partition=0, key=b"c", value=None),
    ]
    # Nothing is called: the backend's own thread serves the acknowledgements.
    _until(lambda: all(f.is_done for f in futures), 10)
    assert [f.succeeded() for f in futures] == [True, True, True]
    assert [(f.value.topic, f.value.partition, f.value.offset) for f in futures] == [
        (t, 0, 0),
        (t, 0, 1),
        (t, 0, 2),
    ]

    consumer: GroupConsumer = closing(backend.consumer())
    events = RebalanceEvents()
    consumer.subscribe(t, events)
    records = _read(consumer, 3)
    assert [(r.topic, r.partition, r.offset, r.key, r.value, r.headers) for r in records] == [
        (t, 0, 0, b"a", b"1", [("h", b"x"), ("h2", b"")]),
        (t, 0, 1, None, b"2", []),
        (t, 0, 2, b"c", None, []),
    ]
    assert all(abs(r.timestamp / 1000 - time.time()) < 60 for r in records)
    assert events.take()[0] == {TopicPartition(t, 0)}
    assert consumer.member() is True
    consumer.close(5000)
    assert consumer.member() is False


def test_transaction_commits_records_and_offsets_and_an_abort_stays_invisible(
    backend: ConfluentBackend, topics: TopicFactory, closing: Callable[[Any], Any]
) -> None:
    names = topics({"in": 1, "out": 1})
    consumer: GroupConsumer = closing(backend.consumer())
    events = RebalanceEvents()
    consumer.subscribe(names["in"], events)
    tp_in = TopicPartition(names["in"], 0)
    assert _joined(consumer, events) == {tp_in}

    producer: RecordProducer = closing(backend.producer(f"tx-{names['out']}"))
    producer.init_transactions()
    producer.begin_transaction()
    _produce(producer, names["out"], 0, 2, b"ok")
    beats: list[int] = []
    producer.send_offsets_to_transaction({tp_in: 5}, consumer.group_metadata(), NO_ABANDON, lambda: None)
    producer.commit_transaction(NO_ABANDON, lambda: beats.append(1))
    assert consumer.committed(tp_in, 5000) == 5

    producer.begin_transaction()
    _produce(producer, names["out"], 0, 1, b"no")
    producer.abort_transaction(NO_ABANDON, lambda: None)

    reader: Reader = closing(backend.reader())
    tp_out = TopicPartition(names["out"], 0)
    reader.assign([tp_out])
    # 2 records and a commit marker, 1 record and an abort marker.
    assert reader.end_offsets([tp_out], 5000) == {tp_out: 5}
    assert [r.value for r in _read(reader, 3, timeout_s=3)] == [b"ok0", b"ok1"]
    _until(lambda: reader.position(tp_out, 1000) == 5, 5)


def test_end_offsets_stop_before_an_open_transaction(
    backend: ConfluentBackend, topics: TopicFactory, closing: Callable[[Any], Any]
) -> None:
    t = topics({"in": 1})["in"]
    tp = TopicPartition(t, 0)
    plain: RecordProducer = closing(backend.producer(None))
    _produce(plain, t, 0, 2)
    tx: RecordProducer = closing(backend.producer(f"tx-{t}"))
    tx.init_transactions()
    tx.begin_transaction()
    _produce(tx, t, 0, 3)  # acknowledged, not committed
    reader: Reader = closing(backend.reader())
    reader.assign([tp])
    assert reader.beginning_offsets([tp], 5000) == {tp: 0}
    assert reader.end_offsets([tp], 5000) == {tp: 2}
    assert [r.offset for r in _read(reader, 3, timeout_s=2)] == [0, 1]
    tx.commit_transaction(NO_ABANDON, lambda: None)
    assert reader.end_offsets([tp], 5000) == {tp: 6}
    assert [r.offset for r in _read(reader, 3)] == [2, 3, 4]


def test_a_revocation_calls_before_revoke_and_commits_its_offsets(
    kafka: LocalKafka,
    tmp_path: Path,
    backend: ConfluentBackend,
    topics: TopicFactory,
    closing: Callable[[Any], Any],
) -> None:
    t = topics({"in": 2})["in"]
    asked: list[set[TopicPartition]] = []

    def before_revoke(revoked: set[TopicPartition]) -> dict[TopicPartition, int]:
        asked.append(set(revoked))
        return {tp: 7 for tp in revoked}

    first: GroupConsumer = closing(backend.consumer())
    first_events = RebalanceEvents(before_revoke=before_revoke)
    first.subscribe(t, first_events)
    assert _joined(first, first_events) == {TopicPartition(t, 0), TopicPartition(t, 1)}

    second: GroupConsumer = closing(backend.consumer())
    second_events = RebalanceEvents()
    second.subscribe(t, second_events)
    taken: set[TopicPartition] = set()
    deadline = time.monotonic() + 30
    while not taken and time.monotonic() < deadline:
        first.poll(100)
        second.poll(100)
        taken = second_events.take()[0]
    (moved,) = taken  # cooperative-sticky: one partition moves, the other stays
    assert asked == [{moved}]
    assert first_events.take() == (set(), {moved}, set())
    assert second.committed(moved, 5000) == 7
    (kept,) = {TopicPartition(t, 0), TopicPartition(t, 1)} - {moved}
    assert first.committed(kept, 5000) is None
    assert first.member() is True


def test_pause_resume_positions_committed_and_highwater(
    backend: ConfluentBackend, topics: TopicFactory, closing: Callable[[Any], Any]
) -> None:
    t = topics({"in": 1})["in"]
    tp = TopicPartition(t, 0)
    producer: RecordProducer = closing(backend.producer(None))
    _produce(producer, t, 0, 5)
    consumer: GroupConsumer = closing(backend.consumer())
    events = RebalanceEvents()
    consumer.subscribe(t, events)
    assert _joined(consumer, events) == {tp}
    assert consumer.committed(tp, 5000) is None
    assert consumer.position(tp, 5000) == 0  # nothing committed: earliest

    consumer.pause(tp)
    assert consumer.paused() == {tp}
    assert _read(consumer, 1, timeout_s=1.5) == []
    consumer.resume(tp)
    assert consumer.paused() == set()
    assert [r.offset for r in _read(consumer, 5)] == [0, 1, 2, 3, 4]
    assert consumer.position(tp, 1000) == 5
    assert consumer.highwater(tp) == 5

    consumer.commit({tp: 3}, 5000)
    assert consumer.committed(tp, 5000) == 3
    committing = consumer.commit_async({tp: 4})
    consumer.seek(tp, 1)
    assert consumer.position(tp, 1000) == 1
    assert [r.offset for r in _read(consumer, 4)] == [1, 2, 3, 4]
    _until(lambda: committing.is_done, 10)
    assert committing.succeeded()
    assert consumer.committed(tp, 5000) == 4
    assert consumer.partitions_for_topic(t, 5000) == {0}
    assert consumer.partitions_for_topic("no-such-topic-anywhere", 2000) == set()


def test_reader_assignment_keeps_positions_and_seeks_at_once(
    backend: ConfluentBackend, topics: TopicFactory, closing: Callable[[Any], Any]
) -> None:
    t = topics({"in": 2})["in"]
    p0, p1 = TopicPartition(t, 0), TopicPartition(t, 1)
    producer: RecordProducer = closing(backend.producer(None))
    _produce(producer, t, 0, 4)
    _produce(producer, t, 1, 4)
    reader: Reader = closing(backend.reader())
    reader.assign([p0])
    reader.seek(p0, 2)  # just assigned, not fetching yet
    assert reader.position(p0, 1000) == 2
    assert [(r.partition, r.offset) for r in _read(reader, 2)] == [(0, 2), (0, 3)]
    reader.assign([p0, p1])  # p0 goes on from where it is
    reader.seek_to_beginning(p1)
    assert reader.position(p1, 5000) == 0
    assert sorted((r.partition, r.offset) for r in _read(reader, 4, timeout_s=5)) == [
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
    ]
    assert reader.assignment() == {p0, p1}
    assert reader.position(p0, 1000) == 4


def test_unknown_partition_is_a_value_error_and_partitions_need_no_request(
    backend: ConfluentBackend, topics: TopicFactory, closing: Callable[[Any], Any]
) -> None:
    t = topics({"in": 2})["in"]
    producer: RecordProducer = closing(backend.producer(None))
    assert producer.partitions(t) is None  # not known yet: tracked from now on
    producer.refresh_metadata(5.0)
    assert producer.partitions(t) == {0, 1}
    with pytest.raises(ValueError, match="no partition 5"):
        producer.send(t, partition=5, key=b"k", value=b"v")


def test_a_poll_returns_what_has_arrived_without_waiting_for_a_full_batch(
    backend: ConfluentBackend, topics: TopicFactory, closing: Callable[[Any], Any]
) -> None:
    """kafka-python's poll returns as soon as records are there; librdkafka's consume
    waits for `max_records` or its timeout. At 1,000 events/s every poll of the run
    loop waited its whole timeout (p50 127 ms in the bench) until `poll` took the
    first record and then only what was already fetched."""
    t = topics({"in": 1})["in"]
    tp = TopicPartition(t, 0)
    producer: RecordProducer = closing(backend.producer(None))
    _produce(producer, t, 0, 3)
    reader: Reader = closing(backend.reader())
    reader.assign([tp])
    reader.seek(tp, 0)
    assert len(_read(reader, 3)) == 3  # fetching: the partition's connection is up
    _produce(producer, t, 0, 3)
    time.sleep(0.5)  # fetched meanwhile
    started = time.monotonic()
    polled = reader.poll(5000, max_records=500)
    took = time.monotonic() - started
    assert [r.offset for r in polled[tp]] == [3, 4, 5]
    assert took < 2.5, f"poll waited {took:.1f} s of its 5 s for a batch of 500"
