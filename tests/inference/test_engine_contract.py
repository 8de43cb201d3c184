"""The engine contract (daemon/engines.py, `Engine`), checked on every engine:
outputs equal the oracle's (tests/oracle.py) at 1e-5, states are fresh read-only
checkpoints, foreign states resume, bad inputs are refused.

What only one engine does is tested in tests/inference/test_engine_keras.py and
tests/inference/test_engine_fast.py, which use the helpers of this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pytest

from daemon.inference.engines import factory
from daemon.inference.engines.contract import Engine
from daemon.inference.engines.fast import FastEngine
from daemon.inference.engines.keras import KerasEngine
from daemon.inference.model import ServableModel
from tests.oracle import assert_matches, expected_outputs, expected_outputs_many
from tests.support.engine_runs import KINDS, interleave
from tests.support.fakes import Slot
from tests.support.models import built, loaded_model


class CountingEngine(Engine, Protocol):
    """An engine that counts the events it stepped (both do)."""

    steps: int


#: Every engine, by name. The annotation makes mypy check that each is an Engine.
ENGINES: dict[str, Callable[[ServableModel], CountingEngine]] = {"keras": KerasEngine, "fast": FastEngine}


@pytest.fixture(scope="module")
def loaded() -> dict[str, ServableModel]:
    return {kind: loaded_model(kind) for kind in KINDS}


@pytest.fixture(params=sorted(ENGINES))
def engine_cls(request: pytest.FixtureRequest) -> Callable[[ServableModel], CountingEngine]:
    """Each engine in turn (test ids "fast", "keras")."""
    return ENGINES[request.param]


def _x(seed: int, n: int, model: ServableModel) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, model.n_features)).astype(np.float32)


def test_every_engine_is_covered() -> None:
    assert sorted(ENGINES) == sorted(factory.ENGINES)


def test_engine_names(
    loaded: dict[str, ServableModel], engine_cls: Callable[[ServableModel], CountingEngine]
) -> None:
    engine: Engine = engine_cls(loaded["lstm_dense"])
    assert ENGINES[engine.name] is engine_cls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interleaved_sequences_match_the_oracle(
    loaded: dict[str, ServableModel],
    engine_cls: Callable[[ServableModel], CountingEngine],
    kind: str,
    seed: int,
) -> None:
    """Several sequences of random lengths interleaved in calls of random sizes,
    repeated slots in one call, random resets: every output equals the oracle's."""
    model = loaded[kind]
    engine = engine_cls(model)
    run = interleave(engine, model, seed)
    assert run.repeated
    assert engine.steps == len(run.events)
    segments = {
        (k, s): seg for k, track in enumerate(run.tracks) for s, seg in enumerate(track.segments) if seg
    }
    oracle = expected_outputs_many(built(kind), [np.stack(seg) for seg in segments.values()])
    expected = dict(zip(segments, oracle, strict=True))
    got = np.stack([y for _, _, _, y in run.events])
    want = np.stack([expected[(k, s)][t] for k, s, t, _ in run.events])
    assert_matches(got, want)


def test_old_state_lists_are_checkpoints(
    loaded: dict[str, ServableModel], engine_cls: Callable[[ServableModel], CountingEngine]
) -> None:
    """The engine never mutates a state it handed out: restoring an old list
    resumes from exactly there. Each slot owns its memory."""
    model = loaded["three_kinds"]
    engine = engine_cls(model)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((8, model.n_features)).astype(np.float32)
    slot, other = Slot(), Slot()
    for i in range(4):
        engine.step([slot, other], np.stack([x[i], -x[i]]))
    checkpoint = slot.tensors
    assert checkpoint is not None and other.tensors is not None
    frozen = [a.copy() for a in checkpoint]
    for a in checkpoint:
        assert not a.flags.writeable
        assert a.dtype == np.float32
        with pytest.raises(ValueError):
            a[0] = 1.0
    assert [a.shape for a in checkpoint] == model.state_shapes
    # No sequence keeps another's (or a wave's) memory alive.
    for a in checkpoint:
        for b in other.tensors:
            assert not np.shares_memory(a, b)
    for i in range(4, 8):
        engine.step([other, slot], np.stack([-x[i], x[i]]))
    for a, b in zip(checkpoint, frozen, strict=True):
        np.testing.assert_array_equal(a, b)
    # Rewind to the checkpoint and take another branch.
    branch = rng.standard_normal((3, model.n_features)).astype(np.float32)
    slot.tensors = checkpoint
    ys = engine.step([slot] * 3, branch)
    expected = expected_outputs(built("three_kinds"), np.concatenate([x[:4], branch]))
    assert_matches(ys, expected[4:])


@pytest.mark.parametrize(("kind", "dtype"), [("multi_output", np.float32), ("stacked_lstm_gru", np.float64)])
def test_foreign_states_resume_identically(
    loaded: dict[str, ServableModel],
    engine_cls: Callable[[ServableModel], CountingEngine],
    kind: str,
    dtype: type[np.floating[Any]],
) -> None:
    """A slot whose tensors are a new list of writeable copies, float32 or float64
    (e.g. restored from a checkpoint store), carries on exactly like the original,
    and its arrays are not touched."""
    model = loaded[kind]
    engine = engine_cls(model)
    x = _x(10, 6, model)
    original = Slot()
    engine.step([original] * 3, x[:3])
    assert original.tensors is not None
    saved = [np.array(a, dtype=dtype) for a in original.tensors]
    before = [a.copy() for a in saved]
    twin = Slot(saved)
    y_twin = engine.step([twin] * 3, x[3:])
    y_orig = engine.step([original] * 3, x[3:])
    np.testing.assert_array_equal(y_twin, y_orig)
    assert_matches(y_orig, expected_outputs(built(kind), x)[3:])
    for a, b in zip(saved, before, strict=True):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)


def test_each_step_leaves_a_fresh_list(
    loaded: dict[str, ServableModel], engine_cls: Callable[[ServableModel], CountingEngine]
) -> None:
    model = loaded["lstm_dense"]
    engine = engine_cls(model)
    slot = Slot()
    engine.step([slot], np.zeros((1, 1), np.float32))
    first = slot.tensors
    engine.step([slot], np.ones((1, 1), np.float32))
    assert slot.tensors is not first
    assert first is not None and slot.tensors is not None
    assert all(a is not b for a, b in zip(first, slot.tensors, strict=True))


def test_a_fresh_slot_is_a_state_of_zeros(
    loaded: dict[str, ServableModel], engine_cls: Callable[[ServableModel], CountingEngine]
) -> None:
    """`tensors` None steps exactly like zeros of the model's state shapes, in
    one call or in separate ones, both like the oracle."""
    model = loaded["stacked_lstm_gru"]
    engine = engine_cls(model)
    assert Slot().tensors is None
    x = _x(11, 1, model)

    def zeros() -> Slot:
        return Slot([np.zeros(shape, np.float32) for shape in model.state_shapes])

    fresh, zeroed = Slot(), zeros()
    together = engine.step([fresh, zeroed], x[[0, 0]])
    np.testing.assert_array_equal(together[0], together[1])
    assert fresh.tensors is not None and zeroed.tensors is not None
    assert [a.shape for a in fresh.tensors] == model.state_shapes
    for a, b in zip(fresh.tensors, zeroed.tensors, strict=True):
        np.testing.assert_array_equal(a, b)
    apart = np.concatenate([engine.step([Slot()], x), engine.step([zeros()], x)])
    np.testing.assert_array_equal(apart[0], apart[1])
    # Not bit for bit across calls: the fast engine's products differ by ~1e-8
    # with the number of sequences in a wave.
    want = expected_outputs(built("stacked_lstm_gru"), x)
    assert_matches(together[:1], want)
    assert_matches(apart[:1], want)


def test_empty_call(
    loaded: dict[str, ServableModel], engine_cls: Callable[[ServableModel], CountingEngine]
) -> None:
    model = loaded["lstm_dense"]
    out = engine_cls(model).step([], np.zeros((0, 1), np.float32))
    assert out.shape == (0, model.output_width)


def test_bad_inputs_are_refused(
    loaded: dict[str, ServableModel], engine_cls: Callable[[ServableModel], CountingEngine]
) -> None:
    engine = engine_cls(loaded["stacked_lstm_gru"])
    with pytest.raises(ValueError, match="shape"):
        engine.step([Slot()], np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="slots"):
        engine.step([Slot(), Slot()], np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="state tensor"):
        engine.step([Slot([np.zeros(8), np.zeros(8), np.zeros(5)])], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="state tensor"):  # all with the same wrong shape
        engine.step([Slot([np.zeros(8), np.zeros(8), np.zeros(5)])] * 2, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="tensors"):
        engine.step([Slot([np.zeros(8)])], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="tensors"):
        engine.step([Slot(), Slot([np.zeros(8)] * 2 + [np.zeros(6)] * 2)], np.zeros((2, 3)))
