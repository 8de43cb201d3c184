"""The catch-up reader under restore and rebuild (daemon/streaming/catchup.py), with
an in-memory input partition: it reads exactly the bounds its reading gives, a partition
with nothing to read is done without being read, and a done partition is released.
Restore and rebuild through it: tests/streaming/test_checkpointing.py, tests/streaming/test_rebuild.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kafka import TopicPartition

from daemon.streaming.catchup import CatchUp, Pace
from tests.support.backends import ported
from tests.support.fakes import settings
from tests.support.kafka import MemoryKafka


class Offsets:
    """Reads into a list the offsets of the records it is given; partition 1 has
    nothing to read, the others offsets [3, 8) of a partition whose first is 2."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int | None, int]] = []

    def bounds(self, partition: int, into: list[int], beginning: int | None, end: int) -> tuple[int, int]:
        self.asked.append((partition, beginning, end))
        return (0, 0) if partition == 1 else (3, 8)

    def read(self, partition: int, into: list[int], records: Sequence[Any]) -> None:
        into.extend(r.offset for r in records)


def test_a_catch_up_reads_its_bounds_and_releases_each_partition_once_done(tmp_path: Path) -> None:
    kafka = MemoryKafka()
    kafka.create_topic("in", 2)
    for partition in (0, 1):
        for _ in range(12):
            kafka.produce("in", b"k", b"{}", partition)
        kafka.delete_before("in", partition, 2)  # retention: the first offset is 2
    consumer = kafka.reader()
    reading = Offsets()
    reads = CatchUp[list[int]](
        lambda: ported(consumer),
        settings(tmp_path),
        "in",
        reading,
        Pace(slice_s=5.0, offsets_timeout_ms=10, min_records=5, max_records=5),
        waiting="test_waiting",
        needs_beginning=True,
    )
    reads.begin(0, [])
    reads.begin(1, [])
    # Nothing to read in partition 1: done at the first step, before any poll, never assigned.
    first = reads.step()
    assert [(d.partition, d.into) for d in first] == [(1, [])] and consumer.polls == 0
    assert reading.asked == [(0, 2, 12), (1, 2, 12)]
    assert consumer.assignment() == {TopicPartition("in", 0)} and list(reads.active) == [0]
    # Partition 0 from its start to its end, then released.
    second = reads.step()
    assert [(d.partition, d.into) for d in second] == [(0, [3, 4, 5, 6, 7])]
    assert not reads.active and consumer.assignment() == set()
    assert reads.step() == [] and consumer.polls == 1
