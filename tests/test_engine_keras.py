"""KerasEngine, the reference engine, against the oracle (tests/oracle.py) at 1e-5."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from daemon.engines import Engine, KerasEngine, StateTensors
from daemon.model import ServableModel, load_model
from tests.models import built
from tests.oracle import assert_matches, expected_outputs

KINDS = ["lstm_dense", "stacked_lstm_gru", "three_kinds", "multi_output", "exotic"]


@dataclass(eq=False)
class Slot:
    """A stand-in for daemon.state.SequenceState: only what engines use."""

    tensors: StateTensors | None = None


@pytest.fixture(scope="module")
def loaded() -> dict[str, ServableModel]:
    return {kind: load_model(built(kind)) for kind in KINDS}


@dataclass
class Track:
    """One sequence as the test sees it: its slot, and the inputs of each segment
    (a reset starts a new segment)."""

    slot: Slot = field(default_factory=Slot)
    segments: list[list[np.ndarray]] = field(default_factory=lambda: [[]])


def _check_against_oracle(
    kind: str, events: list[tuple[int, int, int, np.ndarray]], tracks: list[Track]
) -> None:
    """events: (track, segment, step within segment, y)."""
    expected = {
        (k, s): expected_outputs(built(kind), np.stack(seg))
        for k, track in enumerate(tracks)
        for s, seg in enumerate(track.segments)
        if seg
    }
    got = np.stack([y for _, _, _, y in events])
    want = np.stack([expected[(k, s)][t] for k, s, t, _ in events])
    assert_matches(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interleaved_sequences_match_the_oracle(
    loaded: dict[str, ServableModel], kind: str, seed: int
) -> None:
    """Several sequences of random lengths, interleaved in calls of random sizes
    (a sequence may appear several times in one call), with random resets."""
    model = loaded[kind]
    engine = KerasEngine(model)
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    tracks = [Track() for _ in range(4)]
    remaining = [rnd.randint(2, 9) for _ in tracks]
    events: list[tuple[int, int, int, np.ndarray]] = []
    while any(remaining):
        call: list[int] = []
        for _ in range(rnd.randint(1, 5)):
            live = [k for k, r in enumerate(remaining) if r > 0]
            if not live:
                break
            k = rnd.choice(live)
            if call and rnd.random() < 0.3 and remaining[call[-1]] > 0:
                k = call[-1]  # the same sequence again within the call
            remaining[k] -= 1
            call.append(k)
        for k in set(call):
            if rnd.random() < 0.1 and tracks[k].segments[-1]:
                tracks[k].slot.tensors = None  # a reset: a fresh segment
                tracks[k].segments.append([])
        xs = rng.standard_normal((len(call), model.n_features)).astype(np.float32)
        where = []
        for k, x in zip(call, xs, strict=True):
            seg = tracks[k].segments[-1]
            where.append((k, len(tracks[k].segments) - 1, len(seg)))
            seg.append(x)
        ys = engine.step([tracks[k].slot for k in call], xs)
        assert ys.shape == (len(call), model.output_width) and ys.dtype == np.float32
        events.extend((k, s, t, y) for (k, s, t), y in zip(where, ys, strict=True))
    assert engine.steps == len(events)
    assert 0 < engine.swaps < len(events)  # both paths were taken
    _check_against_oracle(kind, events, tracks)


def test_continuing_sequence_skips_the_swap(loaded: dict[str, ServableModel]) -> None:
    model = loaded["stacked_lstm_gru"]
    engine = KerasEngine(model)
    xs = np.random.default_rng(7).standard_normal((10, model.n_features)).astype(np.float32)
    slot = Slot()
    ys = np.concatenate([engine.step([slot], xs[i : i + 1]) for i in range(5)])
    ys = np.concatenate([ys, engine.step([slot] * 5, xs[5:])])  # repeated within one call
    assert engine.swaps == 1  # only the fresh state at the start
    assert_matches(ys, expected_outputs(built("stacked_lstm_gru"), xs))


def test_reset_of_the_resident_slot(loaded: dict[str, ServableModel]) -> None:
    model = loaded["lstm_dense"]
    engine = KerasEngine(model)
    x = np.random.default_rng(13).standard_normal((4, 1)).astype(np.float32)
    slot = Slot()
    first = engine.step([slot] * 4, x)
    slot.tensors = None  # the sequence ended; the same slot starts a new one
    again = engine.step([slot] * 4, x)
    np.testing.assert_array_equal(again, first)
    assert_matches(again, expected_outputs(built("lstm_dense"), x))


def test_alternating_sequences_swap_every_step(loaded: dict[str, ServableModel]) -> None:
    model = loaded["stacked_lstm_gru"]
    engine = KerasEngine(model)
    rng = np.random.default_rng(8)
    a, b = Slot(), Slot()
    xa = rng.standard_normal((6, model.n_features)).astype(np.float32)
    xb = rng.standard_normal((6, model.n_features)).astype(np.float32)
    ya, yb = [], []
    for i in range(6):
        out = engine.step([a, b], np.stack([xa[i], xb[i]]))
        ya.append(out[0])
        yb.append(out[1])
    assert engine.swaps == 12
    assert_matches(np.stack(ya), expected_outputs(built("stacked_lstm_gru"), xa))
    assert_matches(np.stack(yb), expected_outputs(built("stacked_lstm_gru"), xb))


def test_old_state_lists_are_checkpoints(loaded: dict[str, ServableModel]) -> None:
    """The engine never mutates a state it handed out: restoring an old list
    resumes from exactly there (and needs a swap even on the resident slot)."""
    model = loaded["three_kinds"]
    engine = KerasEngine(model)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((8, model.n_features)).astype(np.float32)
    slot = Slot()
    for i in range(4):
        engine.step([slot], x[i : i + 1])
    checkpoint = slot.tensors
    assert checkpoint is not None
    frozen = [a.copy() for a in checkpoint]
    for a in checkpoint:
        assert not a.flags.writeable
        assert a.dtype == np.float32
    assert [a.shape for a in checkpoint] == model.state_shapes
    for i in range(4, 8):
        engine.step([slot], x[i : i + 1])
    for a, b in zip(checkpoint, frozen, strict=True):
        np.testing.assert_array_equal(a, b)
    # Rewind to the checkpoint and take another branch.
    branch = rng.standard_normal((3, model.n_features)).astype(np.float32)
    slot.tensors = checkpoint
    swaps = engine.swaps
    ys = engine.step([slot] * 3, branch)
    assert engine.swaps == swaps + 1
    expected = expected_outputs(built("three_kinds"), np.concatenate([x[:4], branch]))
    assert_matches(ys, expected[4:])


def test_a_copied_state_resumes_identically(loaded: dict[str, ServableModel]) -> None:
    """A slot whose tensors are a new list (e.g. restored from a checkpoint store)
    is swapped in, and carries on exactly like the original."""
    model = loaded["multi_output"]
    engine = KerasEngine(model)
    x = np.random.default_rng(10).standard_normal((6, model.n_features)).astype(np.float32)
    original = Slot()
    engine.step([original] * 3, x[:3])
    assert original.tensors is not None
    twin = Slot([np.array(a) for a in original.tensors])
    y_twin = engine.step([twin] * 3, x[3:])
    y_orig = engine.step([original] * 3, x[3:])
    np.testing.assert_array_equal(y_twin, y_orig)
    assert_matches(y_orig, expected_outputs(built("multi_output"), x)[3:])


def test_each_step_leaves_a_fresh_list(loaded: dict[str, ServableModel]) -> None:
    model = loaded["lstm_dense"]
    engine = KerasEngine(model)
    slot = Slot()
    engine.step([slot], np.zeros((1, 1), np.float32))
    first = slot.tensors
    engine.step([slot], np.ones((1, 1), np.float32))
    assert slot.tensors is not first
    assert first is not None and slot.tensors is not None
    assert all(a is not b for a, b in zip(first, slot.tensors, strict=True))


def test_zero_state_equals_a_fresh_slot(loaded: dict[str, ServableModel]) -> None:
    model = loaded["stacked_lstm_gru"]
    engine = KerasEngine(model)
    zero = engine.zero_state()
    assert [a.shape for a in zero] == model.state_shapes
    assert all(a.dtype == np.float32 and not a.any() for a in zero)
    x = np.random.default_rng(11).standard_normal((1, model.n_features)).astype(np.float32)
    fresh, zeroed = Slot(), Slot(zero)
    np.testing.assert_array_equal(engine.step([fresh], x), engine.step([zeroed], x))


def test_no_retracing_per_call(loaded: dict[str, ServableModel]) -> None:
    model = loaded["stacked_lstm_gru"]
    engine = KerasEngine(model)
    rng = np.random.default_rng(12)
    slots = [Slot() for _ in range(3)]
    engine.step(slots, rng.standard_normal((3, model.n_features)))
    traces = model.stateful.predict_function.experimental_get_tracing_count()
    for _ in range(20):
        picks = [slots[i] for i in rng.integers(0, 3, size=4)]
        engine.step(picks, rng.standard_normal((4, model.n_features)))
    assert model.stateful.predict_function.experimental_get_tracing_count() == traces == 1


def test_empty_call(loaded: dict[str, ServableModel]) -> None:
    model = loaded["lstm_dense"]
    out = KerasEngine(model).step([], np.zeros((0, 1), np.float32))
    assert out.shape == (0, model.output_width)


def test_bad_inputs_are_refused(loaded: dict[str, ServableModel]) -> None:
    model = loaded["stacked_lstm_gru"]
    engine = KerasEngine(model)
    with pytest.raises(ValueError, match="shape"):
        engine.step([Slot()], np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="slots"):
        engine.step([Slot(), Slot()], np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="state tensor"):
        engine.step([Slot([np.zeros(8), np.zeros(8), np.zeros(5)])], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="tensors"):
        engine.step([Slot([np.zeros(8)])], np.zeros((1, 3)))


def test_keras_engine_is_an_engine(loaded: dict[str, ServableModel]) -> None:
    engine: Engine = KerasEngine(loaded["lstm_dense"])
    assert engine.name == "keras"
