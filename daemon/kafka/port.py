"""The Kafka client port: what the daemon asks of a Kafka client library, and only that.

The run loop, delivery, restore and rebuild talk to Kafka through these three
roles; a backend (`daemon/kafka/backends/`) plays them with one client library:
kafka-python (the default), confluent-kafka (librdkafka), or the in-memory Kafka
of the unit tests. `LSTMD_KAFKA_CLIENT` picks one at start-up.

The vocabulary is kafka-python's plain value types, re-exported here: partitions
(`TopicPartition`), the futures of sends (`Future`: `add_callback`, `add_errback`,
`is_done`, `succeeded()`, `exception`) and the error classes the daemon tells apart
(`kafka.errors`). They carry no I/O, so a backend on another library raises and
returns them too: delivery's rules ("an authorization error is permanent", "a
rebalance in progress defers the commit") are written once, whatever the client.
A record read is anything with the fields of `daemon.core.records.InputRecord`.

Every call that waits takes a bound (`timeout_ms`, or the `abandon` event and the
liveness `beat` of a transaction call): the daemon must see SIGTERM and stay live
during a broker outage, whatever the library would wait by default.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka.future import Future
from kafka.structs import TopicPartition

from daemon.core.records import InputRecord

__all__ = [
    "Backend",
    "BeforeRevoke",
    "Future",
    "GroupConsumer",
    "Polled",
    "Reader",
    "RebalanceEvents",
    "RecordProducer",
    "TopicPartition",
]

# What a poll returns: each partition's records, in offset order.
Polled = Mapping[TopicPartition, Sequence[InputRecord]]
# Offsets to commit (the next offset to read), or None when nothing is to be committed.
BeforeRevoke = Callable[[set[TopicPartition]], "dict[TopicPartition, int] | None"]


@dataclass
class RebalanceEvents:
    """The group's assignment changes, collected for the run loop to apply after `poll`
    returns; the checkpoint of a planned revocation made while it happens.

    A backend calls `assign`, `revoke` and `lose` from within `poll` (or `close`),
    while the run loop's thread waits in that call. A revocation (cooperative
    rebalance: a member joined, or this one leaves) must be checkpointed before the
    partitions move, or their next owner repeats what is in hand; after the callback
    the member rejoins at once and its later commits fail, so the backend calls
    `before_revoke` (the run loop's: outputs and states made durable) and commits
    the offsets it returns inside the callback, within the generation that revoked
    the partitions. A failed revocation commit is only logged: the next owner
    repeats from the previous commit, identically.
    """

    before_revoke: BeforeRevoke | None = None
    assigned: set[TopicPartition] = field(default_factory=set)
    revoked: set[TopicPartition] = field(default_factory=set)
    lost: set[TopicPartition] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        with self.lock:
            self.assigned.update(partitions)

    def checkpoint(self, revoked: set[TopicPartition]) -> dict[TopicPartition, int] | None:
        """The offsets to commit before `revoked` go (never raises: the run loop keeps
        its errors for after `poll`)."""
        if self.before_revoke is None or not revoked:
            return None
        return self.before_revoke(revoked) or None

    def revoke(self, partitions: Iterable[TopicPartition]) -> None:
        with self.lock:
            self.revoked.update(partitions)

    def lose(self, partitions: Iterable[TopicPartition]) -> None:
        """Another member owns them already: nothing may be committed for them."""
        with self.lock:
            self.lost.update(partitions)

    def take(self) -> tuple[set[TopicPartition], set[TopicPartition], set[TopicPartition]]:
        with self.lock:
            out = (self.assigned, self.revoked, self.lost)
            self.assigned, self.revoked, self.lost = set(), set(), set()
        return out


class Reader(Protocol):
    """A consumer without a group, reading partitions by assignment (restore reads the
    state topic, rebuild the input), read-committed."""

    def assign(self, partitions: Sequence[TopicPartition]) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def seek_to_beginning(self, partition: TopicPartition) -> None: ...
    def position(self, partition: TopicPartition, timeout_ms: int) -> int | None:
        """The next offset to read, or None if not known within `timeout_ms`."""

    def beginning_offsets(
        self, partitions: Sequence[TopicPartition], timeout_ms: int
    ) -> dict[TopicPartition, int]:
        """Raises KafkaTimeoutError if not answered within `timeout_ms`."""

    def end_offsets(self, partitions: Sequence[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        """The last stable offsets (read-committed); KafkaTimeoutError if not answered."""

    def poll(self, timeout_ms: int, max_records: int | None = None) -> Polled: ...
    def close(self, timeout_ms: int) -> None: ...


class GroupConsumer(Reader, Protocol):
    """The group member that reads the input topic: its partitions come and go with the
    group (`subscribe`), its offsets are committed to the group."""

    def subscribe(self, topic: str, events: RebalanceEvents) -> None:
        """Join the group for `topic`; report assignment changes to `events` (cooperative
        rebalancing, static membership when the settings name an instance id)."""

    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def highwater(self, partition: TopicPartition) -> int | None:
        """The partition's end as of the last fetch (no request), None before one."""

    def committed(self, partition: TopicPartition, timeout_ms: int) -> int | None:
        """The group's committed offset (None: none yet); KafkaTimeoutError if not answered."""

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        """Commit synchronously. Raises CommitFailedError or RebalanceInProgressError when
        the group moved on, FencedInstanceIdError, AuthorizationError, or another
        KafkaError (retriable) when not answered within `timeout_ms`."""

    def commit_async(self, offsets: Mapping[TopicPartition, int]) -> Future:
        """Commit without waiting; the future fails with the errors of `commit`."""

    def member(self) -> bool:
        """Still a member of the group's current generation: False once the group
        expelled it (session expired, max.poll.interval exceeded). Without a
        transaction this is the only fence of a write."""

    def group_metadata(self) -> Any:
        """The member's group metadata for `RecordProducer.send_offsets_to_transaction`
        (KIP-447: the broker checks the generation), opaque to the daemon."""

    def partitions_for_topic(self, topic: str, timeout_ms: int) -> set[int]:
        """The topic's partitions, asking the cluster for at most `timeout_ms` (empty:
        not known yet; the caller asks again)."""

    def close(self, timeout_ms: int) -> None:
        """Leave the group (a static member stays until its session times out) without
        committing anything."""


class RecordProducer(Protocol):
    """One producer: idempotent (acks=all), transactional when built with an id."""

    def send(
        self,
        topic: str,
        *,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Future:
        """Queue a record; the future is done on its acknowledgement or failure (on
        another thread). `partition` None: the key's partition by the client's
        partitioner. Raises ValueError at once for a partition the producer knows
        the topic lacks, MessageSizeTooLargeError for a record over its limit."""

    def flush(self, timeout: float) -> None:
        """Wait until every record sent is done; KafkaTimeoutError after `timeout` s."""

    def close(self, timeout: float) -> None:
        """Close, abandoning what is not acknowledged after `timeout` s (those futures
        fail). Never raises for what it abandons."""

    def partitions(self, topic: str) -> set[int] | None:
        """The topic's partitions as the producer's metadata knows them now, without a
        request; None while it does not know the topic (it starts tracking it)."""

    def refresh_metadata(self, wait_s: float) -> None:
        """Ask for fresh metadata now; wait for the answer up to `wait_s`."""

    # -- transactions (a producer built with a transactional id) ------------------
    def init_transactions(self) -> None: ...
    def begin_transaction(self) -> None: ...
    def send_offsets_to_transaction(
        self,
        offsets: Mapping[TopicPartition, int],
        group: Any,
        abandon: threading.Event,
        beat: Callable[[], None],
    ) -> None:
        """The transaction commits these input offsets (KIP-447: `group` from the
        consumer's `group_metadata`). Like `commit_transaction` and
        `abort_transaction`, it waits for the coordinator in slices, calling `beat`,
        and raises KafkaTimeoutError when `abandon` is set or after
        TRANSACTION_CALL_TIMEOUT_S (the next producer of the id fences it)."""

    def commit_transaction(self, abandon: threading.Event, beat: Callable[[], None]) -> None: ...
    def abort_transaction(self, abandon: threading.Event, beat: Callable[[], None]) -> None: ...


class Backend(Protocol):
    """One client library's clients, built from the settings' connection and security
    variables (the same meaning whichever library plays the port)."""

    name: str

    def consumer(self) -> GroupConsumer: ...
    def reader(self) -> Reader: ...
    def producer(self, transactional_id: str | None) -> RecordProducer: ...


# How long a transaction call may wait for the coordinator before it is given up on.
TRANSACTION_CALL_TIMEOUT_S = 30.0
