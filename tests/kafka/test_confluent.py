"""The confluent-kafka backend without a broker: librdkafka's errors in kafka-python's
classes, the settings in librdkafka's names (and accepted by librdkafka), and the
producer's bounded waits against a broker that is not there."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka import KafkaError as RdError
from confluent_kafka import TopicPartition as RdPartition
from kafka import TopicPartition, errors

from daemon.kafka.backends import confluent
from daemon.kafka.backends.confluent import (
    ConfluentProducer,
    consumer_config,
    producer_config,
    reader_config,
    translate,
)
from daemon.kafka.port import RebalanceEvents
from tests.support.fakes import settings


@pytest.mark.parametrize(
    ("code", "commit", "expected"),
    [
        (RdError._TIMED_OUT, False, errors.KafkaTimeoutError),
        (RdError._MSG_TIMED_OUT, False, errors.KafkaTimeoutError),
        (RdError._TRANSPORT, False, errors.KafkaConnectionError),
        (RdError._ALL_BROKERS_DOWN, False, errors.KafkaConnectionError),
        (RdError._AUTHENTICATION, False, errors.SaslAuthenticationFailedError),
        (RdError._FENCED, False, errors.ProducerFencedError),
        (RdError.PRODUCER_FENCED, False, errors.ProducerFencedError),
        (RdError.FENCED_INSTANCE_ID, False, errors.FencedInstanceIdError),
        (RdError.FENCED_INSTANCE_ID, True, errors.FencedInstanceIdError),
        (RdError.MSG_SIZE_TOO_LARGE, False, errors.MessageSizeTooLargeError),
        (RdError._UNKNOWN_PARTITION, False, errors.UnknownTopicOrPartitionError),
        (RdError.TOPIC_AUTHORIZATION_FAILED, False, errors.TopicAuthorizationFailedError),
        (RdError._PURGE_INFLIGHT, False, errors.KafkaTimeoutError),
        # The group moved on: what kafka-python's commit raises.
        (RdError.ILLEGAL_GENERATION, True, errors.CommitFailedError),
        (RdError.UNKNOWN_MEMBER_ID, True, errors.CommitFailedError),
        (RdError.REBALANCE_IN_PROGRESS, True, errors.RebalanceInProgressError),
        # Outside a commit a broker's code is its own class.
        (RdError.ILLEGAL_GENERATION, False, errors.IllegalGenerationError),
    ],
)
def test_errors_become_kafka_pythons_classes(code: int, commit: bool, expected: type[Exception]) -> None:
    exc = translate(RdError(code), commit=commit)
    assert type(exc) is expected


def test_a_fatal_error_is_its_cause() -> None:
    """The text of librdkafka's fatal consumer error for a fenced static member."""
    fenced = RdError(RdError.FENCED_INSTANCE_ID).str()
    fatal = RdError(RdError._FATAL, f"Fatal error: {fenced}: Fatal consumer error: {fenced}", fatal=True)
    assert isinstance(translate(fatal), errors.FencedInstanceIdError)
    assert isinstance(translate(fatal, commit=True), errors.FencedInstanceIdError)
    other = RdError(RdError._FATAL, "Fatal error: something else", fatal=True)
    assert type(translate(other)) is errors.KafkaError


def test_another_local_error_keeps_librdkafkas_retriability() -> None:
    exc = translate(RdError(RdError._NODE_UPDATE, retriable=True))
    assert type(exc) is errors.KafkaError
    assert exc.retriable is True
    assert "_NODE_UPDATE" in str(exc)


def test_consumer_settings_mean_what_they_mean_for_kafka_python(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        group_instance_id="pod-0",
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=2000,
        kafka_max_poll_interval_ms=60_000,
    )
    config = consumer_config(s)
    del config["logger"]
    assert config == {
        "bootstrap.servers": "127.0.0.1:1",
        "client.id": "lstmd-0.1.0",
        "security.protocol": "PLAINTEXT",
        "reconnect.backoff.max.ms": 1000,
        "topic.metadata.refresh.interval.ms": 30_000,
        "log_level": 4,
        "group.id": "g",
        "group.instance.id": "pod-0",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "allow.auto.create.topics": False,
        "max.poll.interval.ms": 60_000,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 2000,
        "partition.assignment.strategy": "cooperative-sticky",
        "enable.partition.eof": False,
    }
    assert "group.instance.id" not in consumer_config(settings(tmp_path))
    Consumer(consumer_config(s)).close()  # librdkafka knows every name and value
    Consumer(reader_config(s)).close()


def test_security_settings_and_the_password_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    for path in (ca, cert, key):
        path.write_text("pem")
    s = settings(
        tmp_path,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="lstmd",
        kafka_sasl_password_file=secret,
        kafka_ssl_cafile=ca,
        kafka_ssl_certfile=cert,
        kafka_ssl_keyfile=key,
    )
    config = producer_config(s, None)
    assert {k: v for k, v in config.items() if k.startswith(("sasl.", "ssl.", "security."))} == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "lstmd",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(ca),
        "ssl.certificate.location": str(cert),
        "ssl.key.location": str(key),
    }
    plain = settings(
        tmp_path,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
    )
    assert not any(k.startswith("ssl.") for k in producer_config(plain, None))
    Producer(producer_config(plain, None)).close()  # librdkafka takes it as it is


def test_producer_settings(tmp_path: Path) -> None:
    s = settings(tmp_path, kafka_compression="zstd", max_record_bytes=4 << 20)
    config = producer_config(s, None)
    expected = {
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "batch.size": 128 << 10,
        "message.max.bytes": (4 << 20) + (64 << 10),
        "compression.type": "zstd",
        "message.timeout.ms": 120_000,
    }
    assert {k: config[k] for k in expected} == expected
    assert "transactional.id" not in config
    tx = producer_config(settings(tmp_path, kafka_compression="none"), "lstmd-0")
    assert (tx["transactional.id"], tx["transaction.timeout.ms"], tx["message.timeout.ms"]) == (
        "lstmd-0",
        10_000,
        10_000,
    )
    assert tx["compression.type"] == "none"
    Producer(tx).close()


def test_close_abandons_what_an_absent_broker_never_acknowledged(tmp_path: Path) -> None:
    producer = ConfluentProducer(settings(tmp_path), None)
    futures = [producer.send("t", partition=0, key=b"k", value=b"v") for _ in range(3)]
    started = time.monotonic()
    producer.close(0.5)
    took = time.monotonic() - started
    assert took < 1.5
    assert [f.is_done for f in futures] == [True, True, True]
    assert all(isinstance(f.exception, errors.KafkaTimeoutError) for f in futures)


def test_flush_is_bounded(tmp_path: Path) -> None:
    producer = ConfluentProducer(settings(tmp_path), None)
    producer.send("t", partition=None, key=b"k", value=b"v")
    with pytest.raises(errors.KafkaTimeoutError, match="1 records not acknowledged"):
        producer.flush(0.2)
    producer.close(0)


def test_a_full_queue_is_retried_then_timed_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = confluent.producer_config

    def tiny_queue(*args: Any) -> dict[str, Any]:
        return {**original(*args), "queue.buffering.max.messages": 1}

    monkeypatch.setattr(confluent, "producer_config", tiny_queue)
    monkeypatch.setattr(confluent, "MAX_BLOCK_MS", 300)
    producer = ConfluentProducer(settings(tmp_path), None)
    producer.send("t", partition=0, key=b"k", value=b"1")
    started = time.monotonic()
    with pytest.raises(errors.KafkaTimeoutError, match="queue stayed full for 300 ms"):
        producer.send("t", partition=0, key=b"k", value=b"2")
    assert 0.3 <= time.monotonic() - started < 1.0
    producer.close(0)


class _Fatal:
    """A librdkafka producer in a fatal state: flush and purge raise (as seen after a
    transaction the broker refused to end, INVALID_TXN_STATE)."""

    def __init__(self, real: Producer) -> None:
        self.real = real

    def flush(self, *args: Any, **kwargs: Any) -> int:
        raise KafkaException(RdError(RdError.INVALID_TXN_STATE, "Failed to end transaction", fatal=True))

    purge = flush

    def poll(self, *args: Any) -> int:
        return int(self.real.poll(*args))

    def __len__(self) -> int:
        return 1


def test_a_fatal_producer_is_closed_without_raising_and_its_flush_raises_kafka_pythons_error(
    tmp_path: Path,
) -> None:
    """Delivery closes a producer in a fatal state to replace it (`renew`): the close
    must not raise (it did: the daemon exited 1 during a broker outage, exactly-once)."""
    producer = ConfluentProducer(settings(tmp_path), None)
    real = producer._producer
    producer._producer = _Fatal(real)  # type: ignore[assignment]
    with pytest.raises(errors.KafkaError):
        producer.flush(0.1)
    producer.close(0.1)  # does not raise
    real.flush(0)


def test_a_revocation_commits_on_its_own_thread_and_cancels_the_queued_commits(tmp_path: Path) -> None:
    """librdkafka serves no other thread's commit while a rebalance waits for its callback:
    the revocation's commit goes on the callback's thread, and commits queued behind a
    running one are cancelled (they would land after it with older offsets). Fails on
    the committer thread's way: the revocation's commit waits behind the running one."""
    consumer = confluent.ConfluentConsumer(settings(tmp_path))
    tp = TopicPartition("in", 0)
    gate = threading.Event()
    calls: list[tuple[str, dict[TopicPartition, int]]] = []

    def commit_now(offsets: Mapping[TopicPartition, int]) -> None:
        calls.append((threading.current_thread().name, dict(offsets)))
        if threading.current_thread().name.startswith("librdkafka-commit"):
            gate.wait(10)

    consumer._commit_now = commit_now  # type: ignore[method-assign]
    try:
        running = consumer.commit_async({tp: 1})
        queued = consumer.commit_async({tp: 2})
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        consumer._events = RebalanceEvents(before_revoke=lambda revoked: {p: 3 for p in revoked})
        consumer._on_revoke(consumer._consumer, [RdPartition("in", 0)])
        assert calls[-1] == (threading.current_thread().name, {tp: 3})
        assert queued.is_done and isinstance(queued.exception, errors.CommitFailedError)
        gate.set()
        deadline = time.monotonic() + 5
        while not running.is_done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.succeeded()
        assert [offsets for _, offsets in calls] == [{tp: 1}, {tp: 3}]  # 2 never committed
    finally:
        gate.set()
        consumer.close(5000)  # waited: librdkafka logs while it closes


def test_every_rebalance_callback_applies_its_own_assignment_change(tmp_path: Path) -> None:
    """confluent-kafka applies a change a callback did not make by first asking librdkafka
    for the rebalance protocol, a call that can wait forever once the consumer is closing
    (librdkafka#4041), holding the GIL: a test process froze at a consumer's close in a
    clean-clone run. Each callback makes the change itself, with the partitions given."""

    class Recording:
        def __init__(self) -> None:
            self.calls: list[tuple[str, list[tuple[str, int]]]] = []

        def incremental_assign(self, partitions: list[RdPartition]) -> None:
            self.calls.append(("incremental_assign", [(p.topic, p.partition) for p in partitions]))

        def incremental_unassign(self, partitions: list[RdPartition]) -> None:
            self.calls.append(("incremental_unassign", [(p.topic, p.partition) for p in partitions]))

    consumer = confluent.ConfluentConsumer(settings(tmp_path))
    try:
        consumer._events = RebalanceEvents()
        given = Recording()
        consumer._on_assign(given, [RdPartition("in", 0), RdPartition("in", 1)])  # type: ignore[arg-type]
        consumer._on_revoke(given, [RdPartition("in", 1)])  # type: ignore[arg-type]
        consumer._on_lost(given, [RdPartition("in", 0)])  # type: ignore[arg-type]
        assert given.calls == [
            ("incremental_assign", [("in", 0), ("in", 1)]),
            ("incremental_unassign", [("in", 1)]),
            ("incremental_unassign", [("in", 0)]),
        ]
    finally:
        consumer.close(5000)


def test_a_callback_that_raises_still_makes_its_change_and_its_error_comes_out_of_poll(
    tmp_path: Path,
) -> None:
    """A revocation whose checkpoint fails (the shutdown deadline passed in an outage):
    nothing leaves the callback (confluent-kafka's fallback would ask for the rebalance
    protocol, which can hang), the unassignment is made, and the error is raised by the
    poll that ran the callback, as it was before."""

    class Recording:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def incremental_unassign(self, partitions: list[RdPartition]) -> None:
            self.calls.append("incremental_unassign")

    def failing(revoked: set[TopicPartition]) -> dict[TopicPartition, int]:
        raise RuntimeError("the final checkpoint was not committed before the shutdown deadline")

    consumer = confluent.ConfluentConsumer(settings(tmp_path))
    try:
        consumer._events = RebalanceEvents(before_revoke=failing)
        given = Recording()
        consumer._on_revoke(given, [RdPartition("in", 0)])  # type: ignore[arg-type]
        assert given.calls == ["incremental_unassign"]
        with pytest.raises(RuntimeError, match="shutdown deadline"):
            consumer.poll(10)
        assert consumer.poll(10) == {}  # raised once
    finally:
        consumer.close(5000)
