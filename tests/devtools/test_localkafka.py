"""The local broker is a real Kafka: groups commit, data survives a restart and
transactions isolate aborted records (the daemon's exactly-once depends on it)."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.devtools.localkafka import KAFKA_JAR, LocalKafka, create_topics, ensure_jars, random_cluster_id

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

TopicFactory = Callable[..., dict[str, str]]
FAST_GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}


def consume(
    bootstrap: str, topic: str, count: int, timeout: float = 20.0, **config: Any
) -> tuple[KafkaConsumer, list[bytes]]:
    """Poll until `count` values arrived (or the timeout); return the open consumer too."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **config,
    )
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(values) < count and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            values.extend(r.value for r in records)
    return consumer, values


def test_jars_and_cluster_id() -> None:
    assert (ensure_jars() / KAFKA_JAR).is_file()
    cid = random_cluster_id()
    assert len(cid) == 22 and not cid.startswith("-")
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_produce_and_consume_in_a_group(kafka: LocalKafka, topics: TopicFactory) -> None:
    topic = topics({"t": 1})["t"]
    create_topics(kafka.bootstrap, {topic: 1})  # idempotent
    sent = [f"record-{i}".encode() for i in range(100)]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    for value in sent:
        producer.send(topic, value)
    producer.flush(timeout=30)
    producer.close()

    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer, got = consume(kafka.bootstrap, topic, 100, group_id=group, **FAST_GROUP)
    try:
        assert got == sent
        consumer.commit()
        assert consumer.committed(TopicPartition(topic, 0)) == 100
    finally:
        consumer.close()


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_restart_keeps_data_and_clients_reconnect(
    kafka_broker_factory: Callable[..., LocalKafka], hard: bool
) -> None:
    broker = kafka_broker_factory()
    bootstrap, port = broker.bootstrap, broker.port
    create_topics(bootstrap, {"r": 1})
    # Reconnect within a second of the broker returning (default backoff grows to 30 s).
    producer = KafkaProducer(bootstrap_servers=bootstrap, reconnect_backoff_max_ms=1000)
    try:
        for i in range(10):
            producer.send("r", f"before-{i}".encode())
        producer.flush(timeout=30)
        broker.restart(down_for=1.0, hard=hard)
        assert (broker.bootstrap, broker.port) == (bootstrap, port)
        for i in range(10):  # the same producer, across the outage
            producer.send("r", f"after-{i}".encode())
        producer.flush(timeout=30)
    finally:
        producer.close()
    consumer, got = consume(bootstrap, "r", 20)
    consumer.close()
    assert got == [f"before-{i}".encode() for i in range(10)] + [f"after-{i}".encode() for i in range(10)]


def test_transactions_hide_aborted_records(kafka: LocalKafka, topics: TopicFactory) -> None:
    topic = topics({"tx": 1})["tx"]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic, b"aborted")
        producer.flush(timeout=30)
        producer.abort_transaction()
        producer.begin_transaction()
        producer.send(topic, b"committed")
        producer.commit_transaction()
    finally:
        producer.close()

    committed, got = consume(kafka.bootstrap, topic, 1, isolation_level="read_committed")
    try:
        # Polling once more past the commit marker proves nothing else is visible.
        got.extend(r.value for rs in committed.poll(timeout_ms=500).values() for r in rs)
    finally:
        committed.close()
    assert got == [b"committed"]
    raw, everything = consume(kafka.bootstrap, topic, 2, isolation_level="read_uncommitted")
    raw.close()
    assert everything == [b"aborted", b"committed"]
