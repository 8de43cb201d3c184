"""The four topics: at start-up they exist, agree, and may be used; while running,
their partition counts are watched (partitions may be added at any time)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource
from kafka.errors import AuthorizationError, GroupAuthorizationFailedError, KafkaError, for_code
from kafka.partitioner.default import murmur2

from daemon.config import Settings
from daemon.errors import KafkaSetupError
from daemon.kafka.acl import authorization_failure, principal, topic_refusal, topic_roles
from daemon.kafka.clients import max_message_bytes
from daemon.kafka.port import RecordProducer
from daemon.ops.logs import get_logger

log = get_logger(__name__)

# Compacted: only the latest state of each sequence matters. Tombstones are kept a
# day so a restore that starts just before compaction still sees deletions.
STATE_TOPIC_CONFIG = {"cleanup.policy": "compact", "delete.retention.ms": "86400000"}
# Kafka protocol error codes in a Metadata answer. A principal without Describe on a
# topic gets TOPIC_AUTHORIZATION_FAILED whether or not the topic exists.
UNKNOWN_TOPIC_OR_PARTITION = 3
TOPIC_AUTHORIZATION_FAILED = 29
# In a CreateTopics answer: someone else (another pod, an operator) created it first.
TOPIC_ALREADY_EXISTS = 36
# What Kafka counts against max.message.bytes beyond a record's value: the record
# batch's header (61 bytes) and the record's own fields (varints, at most ~30 bytes).
STATE_RECORD_OVERHEAD_BYTES = 96


def ensure_topics(admin: KafkaAdminClient, settings: Settings) -> int:
    """Check the topics exist and the daemon may use them (or create them if allowed);
    return input partitions.

    The topics are described by name: listing them would silently leave out
    those the principal may not see, and a missing ACL would read as a missing
    topic. The consumer group is checked too, so a missing ACL ends the daemon
    at start-up with its name instead of failing deep in the consumer.

    The state topic must have at least as many partitions as the input (state of
    input partition p lives in state partition p; more are unused until the input
    grows, which is the order partitions are added in) and is created compacted.
    """
    roles = topic_roles(settings)
    described = {t["name"]: t for t in admin.describe_topics(list(roles))}
    _check_topic_acls(settings, described)
    _check_group_acl(admin, settings)
    existing = {name for name, t in described.items() if t["error_code"] != UNKNOWN_TOPIC_OR_PARTITION}
    if settings.input_topic not in existing and not settings.create_topics:
        raise KafkaSetupError(
            f"missing Kafka topic: {settings.input_topic} (LSTMD_INPUT_TOPIC); create it, "
            "or set LSTMD_CREATE_TOPICS=true"
        )
    partitions = _partitions(admin, settings.input_topic) if settings.input_topic in existing else 1
    wanted: dict[str, dict[str, Any]] = {
        settings.input_topic: {"num_partitions": partitions},
        settings.output_topic: {"num_partitions": partitions},
        settings.dlq_topic: {
            "num_partitions": partitions,
            "configs": {"max.message.bytes": str(max_message_bytes(settings))},
        },
        settings.state_topic: {"num_partitions": partitions, "configs": STATE_TOPIC_CONFIG},
    }
    if settings.shadow_model_path is not None:
        wanted[settings.shadow_topic] = {"num_partitions": partitions}
    missing = {t: spec for t, spec in wanted.items() if t not in existing}
    if missing and not settings.create_topics:
        raise KafkaSetupError(
            f"missing Kafka topics: {', '.join(sorted(missing))} (create them, or set "
            "LSTMD_CREATE_TOPICS=true)"
        )
    if missing:
        _create_topics(admin, settings, missing)
        log.info("topics_created", topics=sorted(missing), partitions=partitions)
        # Whoever won a creation race chose the partition count: read it back.
        partitions = _partitions(admin, settings.input_topic)
    state_partitions = _partitions(admin, settings.state_topic)
    if state_partitions < partitions:
        raise KafkaSetupError(
            f"state topic {settings.state_topic} has {state_partitions} partitions, the input "
            f"topic {settings.input_topic} has {partitions}: add partitions to the state topic "
            f"(kafka-topics.sh --alter --partitions {partitions}); it needs at least the input's"
        )
    return partitions


def state_record_bytes(value_bytes: int) -> int:
    """The bytes a state record of a value of `value_bytes` takes in a record batch,
    its sequence id aside: what the state topic's max.message.bytes must allow."""
    return value_bytes + STATE_RECORD_OVERHEAD_BYTES


def check_state_record_size(admin: KafkaAdminClient, settings: Settings, value_bytes: int) -> int | None:
    """Refuse at start-up a model whose state records the state topic would refuse.

    The broker refuses a record batch over the topic's `max.message.bytes` (its own
    or the broker's default, whichever DescribeConfigs reports): every checkpoint
    would then fail and be retried forever, so the daemon says it once, with both
    numbers, and exits 2. `value_bytes` is the model's largest state record value
    (`daemon.core.state.snapshot_bytes`); a sequence id's bytes come on top, so the
    limit must leave room for them. A topic whose configuration cannot be read (no
    DescribeConfigs ACL) is not checked: a warning says so. Returns the limit (None:
    unknown), for a model promoted later to be checked against it too.
    """
    topic = settings.state_topic
    needed = state_record_bytes(value_bytes)
    try:
        described = admin.describe_configs([ConfigResource("TOPIC", topic)], config_filter="all")
        value = described.get("topic", {}).get(topic, {}).get("max.message.bytes", {}).get("value")
        limit = int(value)
    except (KafkaError, TypeError, ValueError) as exc:
        log.warning("state_record_size_unchecked", topic=topic, error=str(exc) or type(exc).__name__)
        return None
    if needed > limit:
        raise KafkaSetupError(
            f"the model's state records take up to {needed} bytes (plus the sequence id), more than "
            f"the state topic {topic} accepts (max.message.bytes={limit}, LSTMD_STATE_TOPIC): raise "
            f"its max.message.bytes above {needed} plus the longest sequence id, or serve a model "
            "with smaller states (lstmd inspect shows the state bytes per sequence)"
        )
    return limit


def outputs_aligned(admin: KafkaAdminClient, settings: Settings, partitions: int) -> bool:
    """Whether the output and dead-letter topics have the input's partition count (at
    start-up; `Layout.aligned` while running)."""
    topics = (settings.output_topic, settings.dlq_topic)
    return all(_partitions(admin, topic) == partitions for topic in topics)


@dataclass(frozen=True)
class Layout:
    """The partition counts of the daemon's four topics, seen at one moment."""

    input: int
    output: int
    dead_letter: int
    state: int

    @property
    def aligned(self) -> bool:
        """Whether the output and dead-letter topics have the input's partition count:
        then input partition p's outputs can go to their partition p, which keeps each
        key on one output partition without hashing the key for every record. Otherwise
        they go by key (the producer's partitioner)."""
        return self.output == self.input and self.dead_letter == self.input

    @property
    def stateless(self) -> range:
        """Input partitions without a state partition of their number: they cannot be
        restored or checkpointed, so they are not served until the state topic grows."""
        return range(self.state, self.input)


def _topics(settings: Settings) -> tuple[str, str, str, str]:
    return (
        settings.input_topic,
        settings.output_topic,
        settings.dlq_topic,
        settings.state_topic,
    )


def known_layout(producer: RecordProducer, settings: Settings) -> Layout | None:
    """The four topics' partition counts in the producer's metadata: no request, the
    producer refreshes it every METADATA_MAX_AGE_MS (clients.py), all four topics in
    one answer. None while it does not know one of them yet (a new producer knows
    only the topics it has sent to; asking makes it track them)."""
    counts = [producer.partitions(topic) for topic in _topics(settings)]
    if any(known is None for known in counts):
        return None
    return Layout(*(len(known or ()) for known in counts))


def unlisted(producer: RecordProducer, topic: str, partition: int) -> bool:
    """Whether the producer's metadata knows `topic` but not its partition `partition`:
    its `send` then refuses it (ValueError). A topic it does not know at all is not
    judged here: `send` waits for its metadata."""
    known = producer.partitions(topic)
    return known is not None and partition not in known


# The default partitioners of the clients that write input topics, as key -> hash
# (the partition is the hash modulo the partition count): murmur2 for the Java
# client and kafka-python, CRC-32 for librdkafka (confluent-kafka, Go, .NET: its
# default `consistent_random`). A producer with another partitioner is not covered.
PARTITIONERS: dict[str, Callable[[bytes], int]] = {
    "murmur2": lambda key: int(murmur2(key)) & 0x7FFFFFFF,
    "crc32": zlib.crc32,
}


def moved_sequences(open_keys: Iterable[tuple[int, str]], before: int, after: int) -> dict[str, int]:
    """For each default partitioner: how many of the open sequences (input partition,
    key) it had put in their partition with `before` partitions and puts in another one
    with `after`. Their next inputs reach a partition without their state: there they
    start over from a zero state (state is per input partition and key)."""
    moved = dict.fromkeys(PARTITIONERS, 0)
    for partition, key in open_keys:
        raw = key.encode()
        for name, hashed in PARTITIONERS.items():
            h = hashed(raw)
            if h % before == partition and h % after != partition:
                moved[name] += 1
    return moved


def _create_topics(admin: KafkaAdminClient, settings: Settings, missing: dict[str, dict[str, Any]]) -> None:
    """Create the missing topics; one created meanwhile by someone else is fine.

    Pods of one StatefulSet start together, so with LSTMD_CREATE_TOPICS=true
    they race to create the same topics: losing that race is not an error.
    """
    answer = admin.create_topics(missing, raise_errors=False)
    for topic in answer["topics"]:
        code = topic["error_code"]
        if code in (0, TOPIC_ALREADY_EXISTS):
            continue
        error: type[KafkaError] = for_code(code)  # type: ignore[no-untyped-call]
        if issubclass(error, AuthorizationError):
            raise KafkaSetupError(
                f"not authorized to create topics {', '.join(sorted(missing))} as "
                f"{principal(settings)} (LSTMD_CREATE_TOPICS=true): create them, or grant "
                "Create on them"
            )
        raise KafkaSetupError(
            f"could not create topic {topic['name']}: {error.__name__}: "
            f"{topic.get('error_message') or 'no message from the broker'}"
        )
    admin.wait_for_topics(list(missing))


def _check_topic_acls(settings: Settings, described: dict[str, dict[str, Any]]) -> None:
    """Every topic the principal may not use, named in one error.

    TOPIC_AUTHORIZATION_FAILED: no Describe (Kafka does not say whether the topic
    exists). A topic it may describe but lacks Read or Write on shows in the
    operations the broker says the principal is authorized for (KIP-430).
    """
    problems = []
    for topic, (_variables, needs) in topic_roles(settings).items():
        info = described.get(topic)
        if info is None:
            continue
        if info["error_code"] == TOPIC_AUTHORIZATION_FAILED:
            problems.append(topic_refusal(settings, topic, hidden=True))
            continue
        allowed = info.get("authorized_operations")
        if info["error_code"] == 0 and isinstance(allowed, list) and allowed:
            lacking = needs - set(allowed)
            if lacking:
                problems.append(topic_refusal(settings, topic, lacking))
    if problems:
        raise KafkaSetupError("; ".join(problems))


def _check_group_acl(admin: KafkaAdminClient, settings: Settings) -> None:
    """Finding the group's coordinator needs Describe on the group: without it the
    consumer would fail on its first poll. Anything else (a coordinator still
    loading, an older broker) is left to the consumer."""
    try:
        groups = admin.describe_groups([settings.group_id])
    except AuthorizationError as exc:
        raise authorization_failure(settings, exc) from None
    except KafkaError as exc:
        log.debug("group_acl_unchecked", group=settings.group_id, error=str(exc))
        return
    allowed = groups.get(settings.group_id, {}).get("authorized_operations")
    if isinstance(allowed, list) and allowed and "READ" not in allowed:
        raise authorization_failure(settings, GroupAuthorizationFailedError(settings.group_id))


def _partitions(admin: KafkaAdminClient, topic: str) -> int:
    described = admin.describe_topics([topic])
    return len(described[0]["partitions"])
