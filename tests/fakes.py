"""Fakes shared by the unit tests: an engine, records, settings, Kafka clients, a state slot.

Each stands in for one real part at one seam and records what it was asked;
tests import them from here, never from another test module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson
from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.future import Future
from kafka.structs import ConsumerGroupMetadata

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.records import Kind, OutputRecord
from daemon.core.state import StateStore, StateTensors
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord as Rec
from daemon.streaming.delivery import AtLeastOnce, Transactional, make_delivery

TP = TopicPartition("in", 0)


# -- the core ------------------------------------------------------------------


class SumEngine:
    name = "sum"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def step(self, slots: Sequence[object], xs: np.ndarray) -> np.ndarray:
        self.calls.append(len(slots))
        ys = []
        for slot, x in zip(slots, xs, strict=True):
            prev = slot.tensors[0] if slot.tensors is not None else np.zeros_like(x)  # type: ignore[attr-defined]
            new = prev + x
            slot.tensors = [new]  # type: ignore[attr-defined]
            ys.append(new)
        return np.asarray(ys, dtype=np.float32)


def make(
    engine: SumEngine | None = None, model_id: str = "m@0", max_sequences: int = 0
) -> tuple[Processor, Metrics]:
    metrics = Metrics()
    proc = Processor(
        engine or SumEngine(),
        model_id=model_id,
        n_features=1,
        store=StateStore(max_sequences),
        metrics=metrics,
    )
    return proc, metrics


def recs(events: list[tuple[str, dict[str, object]]], partition: int = 0, start: int = 0) -> list[Rec]:
    return [
        Rec("in", partition, start + i, 0, k.encode(), orjson.dumps(v)) for i, (k, v) in enumerate(events)
    ]


def outputs(proc: Processor, records: list[Rec]) -> list[dict[str, object]]:
    return [orjson.loads(o.value or b"") for o in proc.process(records) if not o.dead_letter]


@dataclass(eq=False)
class Slot:
    """A stand-in for daemon.core.state.SequenceState: only what engines use."""

    tensors: StateTensors | None = None


# -- configuration and Kafka ----------------------------------------------------


def settings(tmp_path: Path, **extra: Any) -> Settings:
    """Valid settings for unit tests (no connection is made)."""
    model = tmp_path / "m.keras"
    model.write_bytes(b"x")
    return Settings(
        kafka_bootstrap_servers="127.0.0.1:1",
        input_topic="in",
        output_topic="out",
        group_id="g",
        model_path=model,
        **extra,
    )


def checkpointer(s: Settings, make: Callable[[], object]) -> AtLeastOnce | Transactional:
    return make_delivery(s, cast(Callable[[], KafkaProducer], make), Metrics(), threading.Event())


class FakeProducer:
    def __init__(self, abort_error: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes | None]] = []
        self.calls: list[str] = []
        self.abort_error = abort_error

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None, **_: Any) -> Future:
        self.sent.append((topic, value))
        return Future().success(None)

    def flush(self, timeout: float | None = None) -> None:
        self.calls.append("flush")

    def close(self, timeout: float | None = None) -> None:
        self.calls.append("close")

    def __getattr__(self, name: str) -> Any:  # the transactional calls, recorded
        def call(*_: Any) -> None:
            self.calls.append(name)
            if name == "abort_transaction" and self.abort_error is not None:
                raise self.abort_error

        return call


class FakeConsumer:
    def __init__(self, commit_error: Exception | None = None, generation: int = 3) -> None:
        self.commit_error = commit_error
        self.commits = 0
        self.generation = generation
        self.commit_timeouts: list[int | None] = []  # each commit's bound
        self.async_commits: list[dict[TopicPartition, Any]] = []

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        self.commits += 1
        self.commit_timeouts.append(timeout_ms)
        if self.commit_error is not None:
            raise self.commit_error

    def commit_async(self, offsets: dict[TopicPartition, Any]) -> Future:
        """Answered at once: awaiting it does not yield to kafka-python's loop."""
        self.async_commits.append(offsets)
        if self.commit_error is not None:
            return Future().failure(self.commit_error)
        return Future().success(None)

    def group_metadata(self) -> ConsumerGroupMetadata:
        return ConsumerGroupMetadata("g", self.generation, "member-1", None)


def output(key: bytes = b"k", value: bytes = b"{}") -> OutputRecord:
    return OutputRecord(Kind.PREDICTION, key=key, value=value, partition=0, offset=0, source_timestamp_ms=0)


class FakeStateConsumer:
    """A state partition holding `records`, read in one poll."""

    def __init__(self, records: list[tuple[bytes, bytes | None]], fail_ends: int = 0) -> None:
        self.records = records
        self.fail_ends = fail_ends
        self.read = False
        self.end_timeouts: list[int | None] = []  # each end_offsets call's bound

    def end_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        self.end_timeouts.append(timeout_ms)
        if self.fail_ends:
            self.fail_ends -= 1
            raise KafkaTimeoutError("no leader")
        return dict.fromkeys(tps, len(self.records))

    def assign(self, tps: list[TopicPartition]) -> None: ...

    def seek_to_beginning(self, *tps: TopicPartition) -> None: ...

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return len(self.records) if self.read else 0

    def poll(self, timeout_ms: int = 0, max_records: int = 0) -> dict[TopicPartition, list[Any]]:
        self.read = True
        return {
            TopicPartition("state", 0): [
                type("Rec", (), {"key": k, "value": v, "offset": i})()
                for i, (k, v) in enumerate(self.records)
            ]
        }


class ScaledSumEngine(SumEngine):
    """SumEngine under another model: each step adds `scale * x` (other weights)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def step(self, slots: Sequence[object], xs: np.ndarray) -> np.ndarray:
        return super().step(slots, xs * np.float32(self.scale))


class FakeInputConsumer:
    """An input partition (offsets from `beginning`) read by assignment: `records`
    may be shorter than the offsets (deleted ones are None), polled `max_records` at a time."""

    def __init__(
        self, records: list[Rec | None], beginning: int = 0, fail_beginnings: int = 0, poll_s: float = 0.0
    ) -> None:
        self.records = records
        self.poll_s = poll_s  # each poll takes this long (a slice then holds few polls)
        self.beginning = beginning
        self.fail_beginnings = fail_beginnings
        self.assigned: list[TopicPartition] = []
        self.positions: dict[TopicPartition, int] = {}
        self.polls = 0

    def beginning_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        if self.fail_beginnings:
            self.fail_beginnings -= 1
            raise KafkaTimeoutError("no leader")
        return dict.fromkeys(tps, self.beginning)

    def end_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, len(self.records))

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = list(tps)
        self.positions = {tp: self.positions.get(tp, self.beginning) for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = max(offset, self.beginning)  # out of range: auto reset to earliest

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return self.positions[tp]

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[TopicPartition, list[Any]]:
        self.polls += 1
        if self.poll_s:
            time.sleep(self.poll_s)
        out: dict[TopicPartition, list[Any]] = {}
        for tp in self.assigned:
            at = self.positions[tp]
            chunk = [r for r in self.records[at : at + max_records] if r is not None]
            self.positions[tp] = min(len(self.records), at + max_records)
            if chunk:
                out[tp] = chunk
        return out

    def close(self) -> None: ...


def finish(coro: Coroutine[Any, Any, None]) -> None:
    """Run a rebalance-listener callback (kafka-python awaits them on its IO thread)
    whose awaits are all answered already, as the fakes' are."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise AssertionError("the callback waited on kafka-python's loop")
