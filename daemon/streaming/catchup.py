"""Catch-up: reading partitions from a start offset up to an end fixed when the read
began, in time slices between the run loop's polls.

Restore (the state topic, restore.py) and rebuild (the input topic, rebuild.py) are
both this read, each on a consumer of its own (no group, read_committed). `CatchUp`
owns what they share: the consumer's assignment, begin and cancel, asking the broker
where each read starts and ends (bounded, and asked again while it cannot say), one
slice of reading per `step()`, and a partition's finish: its position reached the end
fixed at begin (so records written meanwhile never hold it back). Restore and rebuild
say only where a read starts and ends and what a record does to what they read into
(`Reading`). The loop's steps and the partition lifecycle: loop.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, Protocol, TypeVar

from daemon.config import Settings
from daemon.core.records import InputRecord
from daemon.kafka.acl import authorization_failure
from daemon.kafka.errors import AuthorizationError, KafkaError
from daemon.kafka.port import Reader, TopicPartition
from daemon.ops.logs import get_logger
from daemon.schemas.registry import RegistryUnavailable

log = get_logger(__name__)

# One wait for a partition's read position: not answered in time, the next step asks again.
POSITION_TIMEOUT_MS = 200
# One poll waits at most this for records: a slice holds several polls.
POLL_TIMEOUT_MS = 100
# Closing a reader (no group to leave) waits at most this.
READER_CLOSE_TIMEOUT_MS = 5000

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


@contextlib.contextmanager
def refusals(settings: Settings, topic: str) -> Iterator[None]:
    """No Describe or Read on a topic read by assignment (or revoked mid-run) is
    permanent: the daemon stops, naming the topic."""
    try:
        yield
    except AuthorizationError as exc:
        raise authorization_failure(settings, exc, topic) from None


@dataclass(frozen=True, slots=True)
class Pace:
    """How a catch-up reads: one step never holds the run loop longer than `slice_s`
    (heartbeats aside, the loop keeps its max.poll.interval promise and its liveness
    beat), whatever a record costs; so a poll asks for as many records as the rest of
    the slice has time for at the measured cost, within [min_records, max_records]
    (equal bounds: a fixed poll size)."""

    slice_s: float
    # One wait for a partition's first and end offsets (asked again at the next step):
    # the client's default, 30 s, would outlast a shutdown deadline during an outage.
    offsets_timeout_ms: int
    min_records: int
    max_records: int
    first_cost_s: float = 50e-6  # the first slice's guess of the seconds per record (then measured)


class Reading(Protocol[T_contra]):
    """What a catch-up does with what it reads into, per partition."""

    def bounds(
        self, partition: int, into: T_contra, beginning: int | None, end: int
    ) -> tuple[int | None, int]:
        """The offsets to read, [start, end), given the partition's first offset (None
        unless `CatchUp(needs_beginning=True)`) and its end now. A start of None reads
        from the beginning (at fetch time: records deleted meanwhile are skipped); a
        start at or past the end reads nothing: the partition is done at once."""
        ...

    def read(self, partition: int, into: T_contra, records: Sequence[InputRecord]) -> None:
        """Records of the partition, in offset order, in any slices."""
        ...


class Done(NamedTuple, Generic[T]):
    """A partition read up to its end: what was read into, and how long it took."""

    partition: int
    into: T
    seconds: float


@dataclass
class _Range:
    started: float = field(default_factory=time.perf_counter)  # the catch-up's duration, from begin
    start: int | None = None
    end: int | None = None  # None: not known yet (the partition has no leader)


class CatchUp(Generic[T]):
    """Partitions of one topic, each read up to its end in slices: `begin` one, `step`
    until it is done (or `cancel` it). One consumer of its own reads them all."""

    def __init__(
        self,
        make_consumer: Callable[[], Reader],
        settings: Settings,
        topic: str,
        reading: Reading[T],
        pace: Pace,
        *,
        waiting: str,
        needs_beginning: bool = False,
    ) -> None:
        """`make_consumer` is called on the first read only (most runs never rebuild);
        `waiting` is the event logged while the broker cannot say where a read ends."""
        self._make_consumer = make_consumer
        self._consumer: Reader | None = None
        self.settings = settings
        self.topic = topic
        self.reading = reading
        self.pace = pace
        self.waiting = waiting
        self.needs_beginning = needs_beginning
        self.active: dict[int, T] = {}  # what each partition being read is read into
        self._ranges: dict[int, _Range] = {}
        self._cost = pace.first_cost_s

    @property
    def consumer(self) -> Reader:
        if self._consumer is None:
            self._consumer = self._make_consumer()
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(READER_CLOSE_TIMEOUT_MS)

    def begin(self, partition: int, into: T) -> None:
        """Read `partition` into `into`; its bounds are asked at the next `locate` or step."""
        self.active[partition] = into
        self._ranges[partition] = _Range()

    def cancel(self, partitions: Sequence[int]) -> None:
        """Revoked, lost or rewound: its read is forgotten."""
        gone = [p for p in partitions if self.active.pop(p, None) is not None]
        for p in gone:
            del self._ranges[p]
        if gone and self._consumer is not None:
            self._assign()

    def locate(self) -> bool:
        """Learn where each new read starts and ends, then assign and seek; False while
        the broker cannot say (no leader during an outage): the next step asks again."""
        with refusals(self.settings, self.topic):
            return self._locate()

    def step(self) -> list[Done[T]]:
        """Read for at most one slice; return the partitions now done (as soon as one is:
        it serves or rebuilds sooner, the others go on at the next step)."""
        with refusals(self.settings, self.topic):
            if not self._locate():
                return []
            deadline = time.monotonic() + self.pace.slice_s
            while self.active and time.monotonic() < deadline:
                done = self._finished()
                if done:
                    return done
                if not self._poll(deadline):
                    break  # a dependency away: the next step tries again
            return self._finished()

    def _locate(self) -> bool:
        unknown = [TopicPartition(self.topic, p) for p, r in self._ranges.items() if r.end is None]
        if not unknown:
            return True
        try:
            beginnings = (
                self.consumer.beginning_offsets(unknown, timeout_ms=self.pace.offsets_timeout_ms)
                if self.needs_beginning
                else {}
            )
            ends = self.consumer.end_offsets(unknown, timeout_ms=self.pace.offsets_timeout_ms)
        except AuthorizationError:
            raise  # permanent: see refusals
        except KafkaError as exc:
            log.warning(self.waiting, partitions=sorted(tp.partition for tp in unknown), error=str(exc))
            return False
        for tp in unknown:
            r = self._ranges[tp.partition]
            r.start, r.end = self.reading.bounds(
                tp.partition, self.active[tp.partition], beginnings.get(tp), ends[tp]
            )
        self._assign()
        for tp in unknown:
            start = self._ranges[tp.partition].start
            if start is None:
                self.consumer.seek_to_beginning(tp)
            elif self._readable(tp.partition):
                self.consumer.seek(tp, start)
        return True

    def _readable(self, partition: int) -> bool:
        """Its bounds known and not empty: the consumer reads it."""
        r = self._ranges[partition]
        return r.end is not None and (r.start is None or r.start < r.end)

    def _assign(self) -> None:
        self.consumer.assign([TopicPartition(self.topic, p) for p in self.active if self._readable(p)])

    def _poll(self, deadline: float) -> bool:
        """One poll, as large as the rest of the slice has time for, fed to the reading;
        False if the reading could not use some of it for now (the Schema Registry away)."""
        room = int((deadline - time.monotonic()) / self._cost)
        size = max(self.pace.min_records, min(self.pace.max_records, room))
        started = time.perf_counter()
        batch = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=size)
        count = 0
        held = False
        for tp, records in batch.items():
            into = self.active.get(tp.partition)
            if into is None:
                continue
            try:
                self.reading.read(tp.partition, into, records)
            except RegistryUnavailable as exc:
                # Nothing of these records was used: read again at a later step (the
                # group consumer's loop holds its own input back meanwhile).
                self.consumer.seek(tp, records[0].offset)
                log.warning(self.waiting, partitions=[tp.partition], error=str(exc))
                held = True
                continue
            count += len(records)
        if count:
            self._cost = max(1e-7, (time.perf_counter() - started) / count)
        return not held

    def _finished(self) -> list[Done[T]]:
        done: list[Done[T]] = []
        for p, r in list(self._ranges.items()):
            if r.end is None:
                continue
            if self._readable(p):
                try:
                    position = self.consumer.position(
                        TopicPartition(self.topic, p), timeout_ms=POSITION_TIMEOUT_MS
                    )
                except KafkaError:  # not answered in time: the next step asks again
                    continue
                if position is None or position < r.end:
                    continue
            done.append(Done(p, self.active.pop(p), time.perf_counter() - r.started))
            del self._ranges[p]
        if done:
            self._assign()
        return done
