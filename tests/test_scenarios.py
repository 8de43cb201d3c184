"""Scenarios written once and run on both Kafkas (the `backend` fixture): the in-memory
one in `make unit`, the real broker in `make test`.

The engine is the running sum of x since the sequence's start (tests/fakes.py
`SumEngine`), so every expected prediction is a prefix sum computed here,
independently of the daemon: exact values, on either Kafka.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from daemon.streaming.loop import RunLoop
from tests.fakes import make
from tests.support.backends import Backend

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


def _expected(n: int) -> dict[str, list[float]]:
    """Per key, the prefix sums of its sequences, in order."""
    sums: dict[str, list[float]] = {k: [] for k in KEYS}
    running = dict.fromkeys(KEYS, 0.0)
    for i in range(n):
        key, step = KEYS[i % len(KEYS)], i // len(KEYS)
        running[key] += float(step % 5)
        sums[key].append(running[key])
        if step % 7 == 6:
            running[key] = 0.0
    return sums


def _predictions(backend: Backend, topic: str) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {k: [] for k in KEYS}
    for raw in backend.values(topic):
        value = orjson.loads(raw or b"{}")
        if "y" in value:
            got[value["seq"]].append(value["y"][0])
    return got


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_stream_is_answered_exactly_and_a_restart_goes_on_from_the_checkpoint(
    backend: Backend, tmp_path: Path, delivery: str
) -> None:
    s = backend.settings(tmp_path, partitions=2, delivery=delivery, checkpoint_interval_ms=0)
    backend.produce(s.input_topic, _stream(40, 2))
    proc, metrics = make()
    loop = backend.loop(s, proc, metrics)
    backend.run_until([loop], lambda: sum(map(len, _predictions(backend, s.output_topic).values())) >= 40)
    _shut_down(loop)

    # A restart: a new processor with nothing in memory restores the states.
    backend.produce(s.input_topic, _stream(40, 2, start=40))
    proc2, metrics2 = make()
    again = backend.loop(s, proc2, metrics2)
    backend.run_until([again], lambda: sum(map(len, _predictions(backend, s.output_topic).values())) >= 80)
    _shut_down(again)
    assert _predictions(backend, s.output_topic) == _expected(80)
    assert metrics2.registry.get_sample_value("lstmd_events_consumed_total") == 40


def _shut_down(loop: RunLoop) -> None:
    loop.stop.set()
    while loop.step():
        pass
    loop.close()
