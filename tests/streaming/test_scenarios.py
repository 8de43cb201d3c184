"""Scenarios written once and run on both Kafkas (the `backend` fixture): the in-memory
one in `make unit`, the real broker in `make test`.

The engine is the running sum of x since the sequence's start (tests/support/fakes.py
`SumEngine`), so every expected prediction is a prefix sum computed here,
independently of the daemon: exact values, on either Kafka.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from daemon.core.processor import Processor
from daemon.core.state import StateStore
from daemon.ops.metrics import Metrics
from daemon.streaming.loop import RunLoop
from tests.support.backends import Backend
from tests.support.fakes import ScaledSumEngine, make

KEYS = ["a", "b", "c", "d"]


def _stream(n: int, partitions: int, start: int = 0) -> list[tuple[bytes, bytes, int]]:
    """Interleaved sequences, one per key, key k on partition k % partitions; every
    seventh event of a key ends its sequence."""
    out = []
    for i in range(start, start + n):
        key = KEYS[i % len(KEYS)]
        step = i // len(KEYS)
        value = {"x": [float(step % 5)], "end": step % 7 == 6}
        out.append((key.encode(), orjson.dumps(value), KEYS.index(key) % partitions))
    return out


def _expected(n: int, scale: float = 1.0, start: int = 0) -> dict[str, list[float]]:
    """Per key, the prefix sums of its sequences (times `scale`) of events `start` to n,
    in order: the prefix includes the events before `start`."""
    sums: dict[str, list[float]] = {k: [] for k in KEYS}
    running = dict.fromkeys(KEYS, 0.0)
    for i in range(n):
        key, step = KEYS[i % len(KEYS)], i // len(KEYS)
        running[key] += float(step % 5)
        if i >= start:
            sums[key].append(running[key] * scale)
        if step % 7 == 6:
            running[key] = 0.0
    return sums


def _predictions(backend: Backend, topic: str, model: str | None = None) -> dict[str, list[float]]:
    """Per key, the predictions on `topic` in order (of `model` only, if given)."""
    got: dict[str, list[float]] = {k: [] for k in KEYS}
    for raw in backend.values(topic):
        value = orjson.loads(raw or b"{}")
        if "y" in value and model in (None, value["model"]):
            got[value["seq"]].append(value["y"][0])
    return got


def _answered(backend: Backend, topic: str) -> int:
    return sum(map(len, _predictions(backend, topic).values()))


def _scaled(model_id: str, scale: float) -> tuple[Processor, Metrics]:
    """A processor of another model: each step adds scale * x."""
    metrics = Metrics()
    engine = ScaledSumEngine(scale)
    return Processor(engine, model_id=model_id, n_features=1, store=StateStore(), metrics=metrics), metrics


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_stream_is_answered_exactly_and_a_restart_goes_on_from_the_checkpoint(
    backend: Backend, tmp_path: Path, delivery: str
) -> None:
    s = backend.settings(tmp_path, partitions=2, delivery=delivery, checkpoint_interval_ms=0)
    backend.produce(s.input_topic, _stream(40, 2))
    proc, metrics = make()
    loop = backend.loop(s, proc, metrics)
    backend.run_until([loop], lambda: _answered(backend, s.output_topic) >= 40)
    _shut_down(loop)

    # A restart: a new processor with nothing in memory restores the states.
    backend.produce(s.input_topic, _stream(40, 2, start=40))
    proc2, metrics2 = make()
    again = backend.loop(s, proc2, metrics2)
    backend.run_until([again], lambda: _answered(backend, s.output_topic) >= 80)
    _shut_down(again)
    assert _predictions(backend, s.output_topic) == _expected(80)
    assert metrics2.registry.get_sample_value("lstmd_events_consumed_total") == 40


def _shut_down(loop: RunLoop) -> None:
    loop.stop.set()
    while loop.step():
        pass
    loop.close()


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_new_model_rebuilds_the_open_sequences_and_answers_on_their_whole_prefix(
    backend: Backend, tmp_path: Path, delivery: str
) -> None:
    s = backend.settings(tmp_path, partitions=2, delivery=delivery, checkpoint_interval_ms=0)
    backend.produce(s.input_topic, _stream(40, 2))
    loop = backend.loop(s, *_scaled("m@aaaa", 1.0))
    backend.run_until([loop], lambda: _answered(backend, s.output_topic) >= 40)
    _shut_down(loop)

    # The new model (twice the step) starts on the same topics: the open sequences are
    # rebuilt from their inputs before the partitions serve; the rebuild publishes nothing.
    backend.produce(s.input_topic, _stream(40, 2, start=40))
    new, metrics = _scaled("m@bbbb", 2.0)
    again = backend.loop(s, new, metrics)
    backend.run_until([again], lambda: _answered(backend, s.output_topic) >= 80)
    _shut_down(again)
    assert _predictions(backend, s.output_topic, "m@aaaa") == _expected(40)
    assert _predictions(backend, s.output_topic, "m@bbbb") == _expected(80, scale=2.0, start=40)
    assert metrics.registry.get_sample_value("lstmd_events_consumed_total") == 40


def _assigned(loop: RunLoop) -> float:
    return loop.metrics.registry.get_sample_value("lstmd_assigned_partitions") or 0.0


def test_a_member_joining_takes_over_partitions_without_a_repeat_or_a_loss(
    backend: Backend, tmp_path: Path
) -> None:
    """Exactly-once, two members in one group: the second joins mid-stream; the partitions
    it takes over go on from the first one's checkpoint, every prediction once."""
    s = backend.settings(tmp_path, partitions=2, delivery="exactly-once")
    backend.produce(s.input_topic, _stream(40, 2))
    first = backend.loop(s, *make())
    backend.run_until([first], lambda: _answered(backend, s.output_topic) >= 40)
    second = backend.loop(s, *make())
    # Each loop's own count, set on its thread: librdkafka's assignment() asked from this
    # thread holds the GIL while its rebalance waits for a callback that needs it.
    backend.run_until([first, second], lambda: bool(_assigned(first) and _assigned(second)))
    backend.produce(s.input_topic, _stream(40, 2, start=40))
    backend.run_until([first, second], lambda: _answered(backend, s.output_topic) >= 80)
    for loop in (first, second):
        _shut_down(loop)
    assert _predictions(backend, s.output_topic) == _expected(80)
