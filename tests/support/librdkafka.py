"""Input as librdkafka writes it (confluent-kafka's producer): the tests' third-party
producer, shared by the foreign-producer and registry-format tests."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaException, Producer


class Writer:
    """A librdkafka producer of one codec (or a transactional one), collecting where
    each record landed from its delivery reports."""

    def __init__(self, bootstrap: str, **config: Any) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, **config})
        self.landed: dict[int, tuple[int, int]] = {}

    def write(
        self, topic: str, tag: int, key: bytes | None, value: bytes | None, headers: list[Any] | None = None
    ) -> None:
        def report(err: Any, msg: Any) -> None:
            if err is not None:
                raise KafkaException(err)
            self.landed[tag] = (msg.partition(), msg.offset())

        self.producer.produce(topic, key=key, value=value, headers=headers, on_delivery=report)

    def flush(self) -> dict[int, tuple[int, int]]:
        assert self.producer.flush(30) == 0, "records left unsent"
        return self.landed
