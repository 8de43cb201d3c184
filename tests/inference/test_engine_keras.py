"""What only KerasEngine, the reference engine, does: the resident slot skips
the swap of its state, and one trace serves every call. The engine contract is
checked on it in tests/inference/test_engine_contract.py."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.inference.engines.keras import KerasEngine
from daemon.inference.model import ServableModel
from tests.oracle import assert_matches, expected_outputs
from tests.support.engine_runs import interleave
from tests.support.fakes import Slot
from tests.support.models import built, loaded_model


@pytest.fixture(scope="module")
def loaded() -> dict[str, ServableModel]:
    return {kind: loaded_model(kind) for kind in ["lstm_dense", "stacked_lstm_gru", "three_kinds"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interleaving_takes_both_paths(loaded: dict[str, ServableModel], seed: int) -> None:
    """The interleaved runs of the contract test (whose calls depend on the seed
    alone) both swap states in and continue resident slots."""
    engine = KerasEngine(loaded["stacked_lstm_gru"])
    run = interleave(engine, loaded["stacked_lstm_gru"], seed)
    assert engine.steps == len(run.events)
    assert 0 < engine.swaps < len(run.events)


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


def test_rewinding_the_resident_slot_swaps(loaded: dict[str, ServableModel]) -> None:
    """An old list of the resident slot's own is a checkpoint: restoring it needs
    a swap even though the slot is resident."""
    model = loaded["three_kinds"]
    engine = KerasEngine(model)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((8, model.n_features)).astype(np.float32)
    slot = Slot()
    for i in range(4):
        engine.step([slot], x[i : i + 1])
    checkpoint = slot.tensors
    engine.step([slot] * 4, x[4:])
    branch = rng.standard_normal((3, model.n_features)).astype(np.float32)
    slot.tensors = checkpoint
    swaps = engine.swaps
    ys = engine.step([slot] * 3, branch)
    assert engine.swaps == swaps + 1
    expected = expected_outputs(built("three_kinds"), np.concatenate([x[:4], branch]))
    assert_matches(ys, expected[4:])


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
