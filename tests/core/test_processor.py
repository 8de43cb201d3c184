"""Processor semantics with a fake engine (the real models are tested against the oracle
in the engine and Kafka tests): waves, markers, key reuse, duplicates, dead letters.

The fake engine's state is the running sum of x since the last reset and its output
is that sum, so the expected output of every event is a prefix sum computed here
independently of the processor.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import orjson

from daemon.core.processor import Processor
from daemon.core.state import StateStore
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord as Rec
from tests.support.fakes import SumEngine, make, outputs, recs


def skipped(metrics: Metrics, cause: str) -> float | None:
    return metrics.registry.get_sample_value("lstmd_duplicates_skipped_total", {"cause": cause})


def rejected(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value("lstmd_records_rejected_total", {"reason": reason})


def test_interleaved_sequences_with_markers_match_prefix_sums() -> None:
    rng = random.Random(3)
    events: list[tuple[str, dict[str, object]]] = []
    expected: list[tuple[str, float, int]] = []
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(400):
        key = f"s{rng.randrange(6)}"
        r = rng.random()
        if r < 0.05:  # pure end marker
            events.append((key, {"end": True}))
            sums[key], counts[key] = 0.0, 0
            continue
        x = float(rng.randint(-5, 5))
        start = r < 0.1
        end = 0.1 <= r < 0.2
        if start:
            sums[key], counts[key] = 0.0, 0
        sums[key] = sums.get(key, 0.0) + x
        counts[key] = counts.get(key, 0) + 1
        events.append((key, {"x": [x], "start": start, "end": end}))
        expected.append((key, sums[key], counts[key]))
        if end:
            sums[key], counts[key] = 0.0, 0
    proc, _ = make()
    records = recs(events)
    got = []
    for i in range(0, len(records), 37):  # batch boundaries must not matter
        got += outputs(proc, records[i : i + 37])
    assert [(o["seq"], o["y"][0], o["n"]) for o in got] == expected  # type: ignore[index]


def test_a_batch_steps_each_sequence_once_per_wave() -> None:
    engine = SumEngine()
    proc, _ = make(engine)
    outputs(
        proc,
        recs([("a", {"x": [1]}), ("b", {"x": [1]}), ("a", {"x": [1]}), ("c", {"x": [1]}), ("a", {"x": [1]})]),
    )
    assert engine.calls == [3, 1, 1]


def test_redelivered_offsets_are_not_applied_twice() -> None:
    proc, metrics = make()
    batch = recs([("a", {"x": [1]}), ("a", {"x": [2]})])
    assert [o["y"] for o in outputs(proc, batch)] == [[1.0], [3.0]]
    assert outputs(proc, batch) == []
    assert [o["y"] for o in outputs(proc, recs([("a", {"x": [4]})], start=2))] == [[7.0]]
    assert skipped(metrics, "redelivered") == 2


def test_repeated_step_is_dropped_and_gap_counted() -> None:
    proc, metrics = make()
    got = outputs(
        proc, recs([("a", {"x": [1], "step": 0}), ("a", {"x": [1], "step": 0}), ("a", {"x": [1], "step": 2})])
    )
    assert [o["y"] for o in got] == [[1.0], [2.0]]
    assert skipped(metrics, "step") == 1
    assert metrics.registry.get_sample_value("lstmd_step_gaps_total") == 1


def test_rejected_records_keep_bytes_and_leave_state_alone() -> None:
    proc, metrics = make()
    records = recs([("a", {"x": [1]}), ("a", {"x": [1, 2]}), ("a", {"x": [1]})])
    records.append(Rec("in", 0, 3, 0, None, b"{}"))
    out = proc.process(records)
    dead = [o for o in out if o.dead_letter]
    good = [orjson.loads(o.value or b"") for o in out if not o.dead_letter]
    assert [g["y"] for g in good] == [[1.0], [2.0]]
    assert [(d.key, d.value) for d in dead] == [(b"a", records[1].value), (None, b"{}")]
    headers = dict(dead[0].headers)
    assert headers["lstmd.error.class"] == b"wrong_width"
    assert headers["lstmd.source.offset"] == b"1"
    assert rejected(metrics, "wrong_width") == 1


def test_ended_sequences_free_their_state() -> None:
    proc, metrics = make()
    outputs(
        proc,
        recs(
            [
                ("a", {"x": [1]}),
                ("b", {"x": [1]}),
                ("a", {"x": [1], "end": True}),
                ("b", {"end": True}),
                ("a", {"x": [5]}),
            ]
        ),
    )
    assert len(proc.store) == 1
    assert metrics.registry.get_sample_value("lstmd_active_sequences") == 1
    assert [o["y"] for o in outputs(proc, recs([("a", {"x": [1]})], start=5))] == [[6.0]]


def test_steps_restart_after_a_reset_within_one_batch() -> None:
    proc, metrics = make()
    got = outputs(
        proc,
        recs(
            [
                ("a", {"x": [1], "step": 0}),
                ("a", {"x": [1], "step": 1, "end": True}),
                ("a", {"x": [2], "step": 0}),
                ("a", {"x": [2], "step": 1}),
                ("a", {"end": True}),
                ("a", {"x": [3], "step": 0}),
                ("a", {"x": [4], "step": 0, "start": True}),
            ]
        ),
    )
    assert [o["y"] for o in got] == [[1.0], [2.0], [2.0], [4.0], [3.0], [4.0]]
    assert skipped(metrics, "step") == 0


def test_a_step_gap_resets_the_sequence_when_asked() -> None:
    metrics = Metrics()
    proc = Processor(
        SumEngine(), model_id="m@0", n_features=1, store=StateStore(), metrics=metrics, reset_on_gap=True
    )
    got = outputs(
        proc,
        recs(
            [
                ("a", {"x": [1], "step": 0}),
                ("a", {"x": [2], "step": 1}),
                ("a", {"x": [5], "step": 4}),
                ("a", {"x": [1], "step": 5}),
            ]
        ),
    )
    assert [(o["y"], o["n"]) for o in got] == [([1.0], 1), ([3.0], 2), ([5.0], 1), ([6.0], 2)]
    assert metrics.registry.get_sample_value("lstmd_step_gaps_total") == 1


class NanOnNegativeEngine(SumEngine):
    """The sum engine, but a negative input makes the output (and state) NaN."""

    def step(self, slots: Sequence[object], xs: np.ndarray) -> np.ndarray:
        ys = super().step(slots, xs)
        for i, (slot, x) in enumerate(zip(slots, xs, strict=True)):
            if x[0] < 0:
                slot.tensors = [np.full_like(x, np.nan)]  # type: ignore[attr-defined]
                ys[i] = np.nan
        return ys


def test_a_non_finite_output_is_dead_lettered_and_the_state_kept() -> None:
    proc, metrics = make(NanOnNegativeEngine())
    records = recs([("a", {"x": [1]}), ("a", {"x": [-1]}), ("a", {"x": [2]})])
    out = proc.process(records)
    good = [orjson.loads(o.value or b"") for o in out if not o.dead_letter]
    dead = [o for o in out if o.dead_letter]
    assert [(g["y"], g["n"]) for g in good] == [([1.0], 1), ([3.0], 2)]
    assert [(d.value, dict(d.headers)["lstmd.error.class"]) for d in dead] == [
        (records[1].value, b"nonfinite_output")
    ]
    assert rejected(metrics, "nonfinite_output") == 1


def test_a_refused_output_keeps_the_markers_of_its_record() -> None:
    """x refused, markers applied: `start` resets, `end` resets, the step is seen."""
    proc, _ = make(NanOnNegativeEngine())
    events: list[tuple[str, dict[str, object]]] = [
        ("a", {"x": [1], "step": 0}),
        ("a", {"x": [2], "step": 1}),
        ("a", {"x": [-1], "step": 2, "end": True}),  # refused, yet the sequence ends
        ("a", {"x": [5], "step": 0}),
        ("a", {"x": [7], "step": 1}),
        ("b", {"x": [1]}),
        ("b", {"x": [-1], "start": True}),  # refused, yet b starts over
        ("b", {"x": [10]}),
    ]
    got = [(o["seq"], o["y"], o["n"]) for o in outputs(proc, recs(events))]
    assert got == [
        ("a", [1.0], 1),
        ("a", [3.0], 2),
        ("a", [5.0], 1),
        ("a", [12.0], 2),
        ("b", [1.0], 1),
        ("b", [10.0], 1),
    ]


def test_a_dead_letter_too_large_to_copy_keeps_its_key_and_reason() -> None:
    proc, metrics = make()
    huge = b'{"x": [1], "pad": "' + b"a" * (2 << 20) + b'"}'
    small_bad = b'{"x": "not a list"}'
    records = [Rec("in", 0, 0, 0, b"a", huge), Rec("in", 0, 1, 0, b"a", small_bad)]
    big, small = proc.process(records)
    headers = dict(big.headers)
    assert (big.dead_letter, big.key, big.value) == (True, b"a", None)
    assert headers["lstmd.error.class"] == b"too_large"
    assert headers["lstmd.value.omitted"] == str(len(huge)).encode()
    assert small.value == small_bad and "lstmd.value.omitted" not in dict(small.headers)
    assert rejected(metrics, "too_large") == 1


def test_an_input_without_a_step_keeps_the_last_step_seen() -> None:
    proc, metrics = make()
    events: list[tuple[str, dict[str, object]]] = [
        ("a", {"x": [1], "step": 5}),
        ("a", {"x": [2]}),
        ("a", {"x": [4], "step": 5}),
        ("a", {"x": [8], "step": 6}),
    ]
    got = [(o["y"], o["n"]) for o in outputs(proc, recs(events))]
    assert got == [([1.0], 1), ([3.0], 2), ([11.0], 3)]  # the retried step 5 is dropped
    assert skipped(metrics, "step") == 1
