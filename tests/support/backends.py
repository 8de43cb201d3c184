"""One scenario, two Kafkas: the in-memory one (unit tests) and the real broker.

A test takes the `backend` fixture (tests/conftest.py) and writes its scenario once:
topics, input records, a run loop stepped by hand, the records on the output topics.
On the in-memory Kafka it is a fast unit test; on the real broker (marker `kafka`)
the same steps meet Kafka's own timing: `run_until` then steps until a condition
holds, within a deadline, instead of a fixed number of steps (arroyo's
StreamsTestMixin idea).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.kafka.backends.kafka_python import KafkaPythonBackend, KafkaPythonConsumer, KafkaPythonProducer
from daemon.kafka.clients import max_message_bytes
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.schemas.wire import ValueFormats
from daemon.streaming.delivery import AtLeastOnce, Transactional, make_delivery
from daemon.streaming.loop import RunLoop, transactional_id
from tests.support.kafka import MemoryConsumer, MemoryKafka, MemoryProducer

# The client libraries the daemon runs on (LSTMD_KAFKA_CLIENT). A real-broker module
# runs on both with `BOTH_CLIENTS` in its `pytestmark` (the fixture `kafka_client`,
# tests/conftest.py); the others on the default.
CLIENTS = ("kafka-python", "confluent-kafka")
BOTH_CLIENTS = pytest.mark.parametrize("kafka_client", CLIENTS, indirect=True)


class Backend(Protocol):
    """What a scenario asks of a Kafka."""

    name: str

    def settings(self, tmp_path: Path, partitions: int = 1, **extra: Any) -> Settings:
        """Settings with fresh input, output, dead-letter and state topics."""

    def produce(self, topic: str, records: Iterable[tuple[bytes | None, bytes | None, int]]) -> None:
        """Append (key, value, partition) records, in order, as an upstream producer."""

    def loop(
        self, settings: Settings, processor: Processor, metrics: Metrics, formats: ValueFormats | None = None
    ) -> RunLoop:
        """A started run loop on this Kafka, for the test to step."""

    def values(self, topic: str) -> list[bytes | None]:
        """The values on a topic, partition by partition, as read_committed sees them."""

    def close(self) -> None:
        """Close what the backend opened for the test."""

    def run_until(self, loops: Iterable[RunLoop], done: Callable[[], bool], timeout_s: float = 60.0) -> None:
        """Step the loops in turn until `done()`; fails after `timeout_s` (or, in
        memory, after a step budget: nothing there waits on time)."""


def _settings(tmp_path: Path, bootstrap: str, names: dict[str, str], **extra: Any) -> Settings:
    model = tmp_path / "m.keras"
    model.write_bytes(b"x")
    return Settings(
        kafka_bootstrap_servers=bootstrap,
        input_topic=names["in"],
        output_topic=names["out"],
        dlq_topic=names["dlq"],
        state_topic=names["state"],
        group_id=names.get("group", "g"),
        model_path=model,
        **extra,
    )


def memory_kafka(settings: Settings, partitions: int = 1) -> MemoryKafka:
    """An in-memory Kafka with the settings' four topics (input, output, dead-letter,
    state), for a unit test of one part (delivery, restore) without a run loop."""
    kafka = MemoryKafka()
    names = (settings.input_topic, settings.output_topic, settings.dlq_topic)
    kafka.create_topics(*names, settings.state_topic, partitions=partitions)
    return kafka


def ported(consumer: MemoryConsumer) -> KafkaPythonConsumer:
    """An in-memory consumer as the daemon sees a Kafka consumer: behind the port, in
    the kafka-python backend's wrapper (the in-memory Kafka speaks kafka-python's API)."""
    return KafkaPythonConsumer(cast(KafkaConsumer, consumer))


def ported_producer(producer: MemoryProducer) -> KafkaPythonProducer:
    return KafkaPythonProducer(cast(KafkaProducer, producer))


def unported(consumer: object) -> MemoryConsumer:
    """The in-memory consumer inside a port consumer of `memory_backend` (to read what
    it saw: commits, their bounds)."""
    return cast(MemoryConsumer, cast(KafkaPythonConsumer, consumer).client)


def unported_producer(producer: object) -> MemoryProducer:
    return cast(MemoryProducer, cast(KafkaPythonProducer, producer).client)


def memory_backend(kafka: MemoryKafka, settings: Settings) -> KafkaPythonBackend:
    """The port's backend on the in-memory Kafka: the kafka-python backend's wrappers
    around in-memory clients, made as the daemon makes them."""
    return KafkaPythonBackend(
        settings,
        consumers=lambda: cast(KafkaConsumer, kafka.consumer(settings.group_id)),
        readers=lambda: cast(KafkaConsumer, kafka.reader()),
        producers=lambda txn: cast(KafkaProducer, kafka.producer(txn, max_message_bytes(settings))),
    )


def memory_member(kafka: MemoryKafka, settings: Settings, *, expelled: bool = False) -> KafkaPythonConsumer:
    """The group's only member, owning every input partition (`expelled`: the group has
    since expelled it: it is no member any more, and its commits fail)."""
    consumer = kafka.member(settings.input_topic, group_id=settings.group_id)
    if expelled:
        consumer.expel()
    return ported(consumer)


def memory_delivery(
    kafka: MemoryKafka,
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    abandon: threading.Event | None = None,
    stop: threading.Event | None = None,
    max_request_size: int | None = None,
) -> AtLeastOnce | Transactional:
    """The delivery pipeline of `settings.delivery` on `kafka`'s producers, built as the
    run loop builds it (`make_delivery`; `max_request_size` as the daemon configures
    it unless given); `kafka.producers` are the ones it made."""
    txn = transactional_id(settings)
    size = max_request_size or max_message_bytes(settings)
    return make_delivery(
        settings,
        lambda: ported_producer(kafka.producer(txn, max_request_size=size)),
        metrics or Metrics(),
        stop or threading.Event(),
        abandon=abandon,
    )


def _new_loop(
    settings: Settings, processor: Processor, metrics: Metrics, formats: ValueFormats | None = None
) -> RunLoop:
    return RunLoop(settings, processor, metrics, Health(60), threading.Event(), formats=formats)


@dataclass
class Memory:
    """The in-memory Kafka (tests/support/kafka.py)."""

    kafka: MemoryKafka = field(default_factory=MemoryKafka)
    name: str = "memory"
    max_steps: int = 1000

    def settings(self, tmp_path: Path, partitions: int = 1, **extra: Any) -> Settings:
        names = {"in": "in", "out": "out", "dlq": "in.dlq", "state": "in.state"}
        for topic in names.values():
            self.kafka.create_topic(topic, partitions)
        return _settings(tmp_path, "memory:9092", names, **extra)

    def produce(self, topic: str, records: Iterable[tuple[bytes | None, bytes | None, int]]) -> None:
        for key, value, partition in records:
            self.kafka.produce(topic, key, value, partition)

    def loop(
        self, settings: Settings, processor: Processor, metrics: Metrics, formats: ValueFormats | None = None
    ) -> RunLoop:
        loop = _new_loop(settings, processor, metrics, formats)
        loop.start(loop.startup.assemble(memory_backend(self.kafka, settings)))
        return loop

    def values(self, topic: str) -> list[bytes | None]:
        return self.kafka.values(topic)

    def close(self) -> None:
        pass

    def run_until(self, loops: Iterable[RunLoop], done: Callable[[], bool], timeout_s: float = 60.0) -> None:
        loops = list(loops)
        for _ in range(self.max_steps):
            if done():
                return
            for loop in loops:
                loop.step()
        raise AssertionError(f"not done after {self.max_steps} steps of each loop")


@dataclass
class Broker:
    """The session's real Apache Kafka broker (tests/conftest.py `kafka`, `topics`)."""

    bootstrap: str
    make_topics: Callable[..., dict[str, str]]
    name: str = "broker"
    # The daemon's Kafka client library (LSTMD_KAFKA_CLIENT).
    client: str = "kafka-python"
    _readers: dict[str, tuple[KafkaConsumer, dict[int, list[bytes | None]]]] = field(default_factory=dict)

    def settings(self, tmp_path: Path, partitions: int = 1, **extra: Any) -> Settings:
        names = self.make_topics(
            {"in": partitions, "out": partitions, "dlq": partitions, "state": partitions}
        )
        names["group"] = f"g-{names['in']}"
        return _settings(tmp_path, self.bootstrap, names, **({"kafka_client": self.client} | extra))

    def produce(self, topic: str, records: Iterable[tuple[bytes | None, bytes | None, int]]) -> None:
        from confluent_kafka import Producer  # a third-party client, as users' producers are

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        for key, value, partition in records:
            producer.produce(topic, key=key, value=value, partition=partition)
        assert producer.flush(30) == 0

    def loop(
        self, settings: Settings, processor: Processor, metrics: Metrics, formats: ValueFormats | None = None
    ) -> RunLoop:
        """The daemon's own start-up: topics checked, clients built (`connect`)."""
        loop = _new_loop(settings, processor, metrics, formats)
        clients = loop.connect()
        assert clients is not None
        loop.start(clients)
        return loop

    def values(self, topic: str) -> list[bytes | None]:
        """Read on from where the last call left off (one reader per topic: a new
        consumer costs about a second of metadata and connections)."""
        if topic not in self._readers:
            consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
            )
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(tps)
            self._readers[topic] = (consumer, {tp.partition: [] for tp in tps})
        consumer, got = self._readers[topic]
        tps = sorted(consumer.assignment())
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + 10
        while any((consumer.position(tp) or 0) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for tp, recs in consumer.poll(timeout_ms=200).items():
                got[tp.partition].extend(r.value for r in recs)
        return [v for p in sorted(got) for v in got[p]]

    def close(self) -> None:
        for consumer, _ in self._readers.values():
            consumer.close()

    def run_until(self, loops: Iterable[RunLoop], done: Callable[[], bool], timeout_s: float = 60.0) -> None:
        """Each loop steps in a thread of its own, as members in their own processes
        would: a group's join waits for every member, which one thread stepping them
        in turn cannot give it."""
        loops = list(loops)
        finished = threading.Event()
        errors: list[BaseException] = []

        def drive(loop: RunLoop) -> None:
            try:
                while not finished.is_set():
                    loop.step()
            except BaseException as exc:  # handed to the test's thread
                errors.append(exc)
                finished.set()

        threads = [threading.Thread(target=drive, args=(loop,), daemon=True) for loop in loops]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout_s
        try:
            while not finished.is_set() and not done():
                if time.monotonic() > deadline:
                    raise AssertionError(f"not done after {timeout_s} s")
                time.sleep(0.2)
        finally:
            finished.set()
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]
