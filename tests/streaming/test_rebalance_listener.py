"""The revocation checkpoint (the kafka-python backend's listener) and the bounded waits of a
shutdown, on the in-memory Kafka: what is committed from the callback, what never
is, and the bound every Kafka wait is given. The real-broker test of a member
joining and leaving is tests/broker/test_kafka_e2e.py."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import RebalanceInProgressError

from daemon.kafka.backends.kafka_python import Listener
from daemon.kafka.port import RebalanceEvents
from daemon.ops.metrics import Metrics
from daemon.streaming.delivery import AtLeastOnce
from daemon.streaming.delivery.at_least_once import COMMIT_TIMEOUT_MS
from daemon.streaming.policy import Checkpoint
from daemon.streaming.restore import END_TIMEOUT_MS, Restorer
from tests.support.backends import memory_delivery, memory_kafka, ported
from tests.support.fakes import settings
from tests.support.kafka import MemoryConsumer, MemoryKafka, finish

TP = TopicPartition("in", 2)


def member() -> tuple[MemoryKafka, MemoryConsumer]:
    """The only member of group "g" on "in", owning its four partitions."""
    kafka = MemoryKafka()
    kafka.create_topic("in", 4)
    return kafka, kafka.member("in")


def listener(consumer: MemoryConsumer, offsets: dict[TopicPartition, int] | None) -> Listener:
    asked: list[set[TopicPartition]] = []

    def before_revoke(revoked: set[TopicPartition]) -> dict[TopicPartition, int] | None:
        asked.append(revoked)
        return offsets

    events = Listener(cast(KafkaConsumer, consumer), RebalanceEvents(before_revoke))
    events.asked = asked  # type: ignore[attr-defined]
    return events


def test_a_revocation_commits_what_was_checkpointed_before_it_is_handed_over() -> None:
    kafka, consumer = member()
    events = listener(consumer, {TP: 7})
    finish(events.on_partitions_revoked({TP}))
    assert events.asked == [{TP}]  # type: ignore[attr-defined]
    assert consumer.commits == [{TP: 7}] and kafka.group("g").committed == {TP: 7}
    assert events.events.take() == (set(), {TP}, set())


def test_a_commit_refused_in_the_callback_is_not_an_error_out_of_poll() -> None:
    kafka, consumer = member()
    kafka.faults.commit.append(RebalanceInProgressError())
    events = listener(consumer, {TP: 7})
    finish(events.on_partitions_revoked({TP}))  # does not raise: the next owner repeats
    assert kafka.faults.commit == [] and consumer.commits == []  # tried once, refused
    assert events.events.take()[1] == {TP}


def test_nothing_in_hand_commits_nothing_and_lost_partitions_are_never_committed() -> None:
    kafka, consumer = member()
    events = listener(consumer, None)
    finish(events.on_partitions_revoked({TP}))
    finish(events.on_partitions_lost({TopicPartition("in", 3)}))
    assert events.asked == [{TP}]  # type: ignore[attr-defined]
    assert consumer.commits == [] and kafka.group("g").committed == {}
    assert events.events.take() == (set(), {TP}, {TopicPartition("in", 3)})


def test_offset_commits_and_the_restores_end_offsets_wait_with_a_bound(tmp_path: Path) -> None:
    """kafka-python's default wait is its request timeout (30 s) a call: longer than
    a shutdown deadline during a broker outage. Each call is bounded; the callers
    retry until the deadline."""
    s = settings(tmp_path)
    kafka = memory_kafka(s, partitions=4)
    consumer = kafka.member(s.input_topic, group_id=s.group_id)
    cp = memory_delivery(kafka, s)
    assert isinstance(cp, AtLeastOnce) and cp.commit(ported(consumer), Checkpoint(offsets={TP: 3}))
    assert consumer.commit_timeouts == [COMMIT_TIMEOUT_MS] and consumer.commits == [{TP: 3}]
    state = kafka.reader()
    Restorer(ported(state), s, Metrics()).begin([0])
    assert state.end_timeouts == [END_TIMEOUT_MS]
