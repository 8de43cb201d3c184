"""Fakes shared by the unit tests: an engine, records, settings, a state slot.

Each stands in for one real part at one seam and records what it was asked;
tests import them from here, never from another test module. Kafka is not faked
here: the unit tests run on the in-memory Kafka (tests/support/kafka.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import TopicPartition

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.records import Kind, OutputRecord
from daemon.core.state import StateStore, StateTensors
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord as Rec

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


# -- configuration and records ----------------------------------------------------


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


def output(key: bytes = b"k", value: bytes = b"{}") -> OutputRecord:
    return OutputRecord(Kind.PREDICTION, key=key, value=value, partition=0, offset=0, source_timestamp_ms=0)


class ScaledSumEngine(SumEngine):
    """SumEngine under another model: each step adds `scale * x` (other weights)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def step(self, slots: Sequence[object], xs: np.ndarray) -> np.ndarray:
        return super().step(slots, xs * np.float32(self.scale))
