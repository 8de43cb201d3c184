"""Identical repeats (issue 11, item 4): a prediction recomputed after a crash or a
rebalance is computed again from the same input and state, but in another wave
(of another size, at another place, among other sequences). Every engine must
then give the same bits, outputs and new states alike, not just values within
the tolerance: here each test model's sequences are stepped alone, then in
waves of other sizes and compositions, and every output and state compared by
its bytes."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import pytest

from daemon.core.engine import Engine
from daemon.inference.engines.fast import ACTIVATIONS, FastEngine
from daemon.inference.engines.fast.kernels import Rows
from daemon.inference.model import ServableModel, load_model, mask_value
from tests.support.engine_runs import KINDS
from tests.support.fakes import Slot
from tests.support.models import ZOO, loaded_model

#: How many sequences are followed, and for how many steps.
SEQUENCES = 5
STEPS = 4
#: Per followed sequence and step: the output's bytes, and the new state's (one
#: bytes per state tensor; empty where a test cannot see that state).
Record = tuple[list[list[bytes]], list[list[list[bytes]]]]


def _wide(path: Path) -> Path:
    """Products big enough for OpenBLAS to choose its kernel by the wave's size
    (the small test models may not show it): LSTM(64) on 16 features, GRU(48),
    Dense(3)."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input(shape=(None, 16)),
            keras.layers.LSTM(64, return_sequences=True),
            keras.layers.GRU(48),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(7)
    model.set_weights([w + rng.normal(0.0, 0.2, size=w.shape).astype(w.dtype) for w in model.get_weights()])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="__array__")
        model.save(path / "wide.keras")
    return path / "wide.keras"


MODELS = ["wide", *KINDS, *sorted(ZOO)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ServableModel]:
    cache: dict[str, ServableModel] = {}

    def get(kind: str) -> ServableModel:
        if kind not in cache:
            if kind == "wide":
                cache[kind] = load_model(_wide(tmp_path_factory.mktemp("wide")))
            else:
                cache[kind] = loaded_model(kind)
        return cache[kind]

    return get


def _inputs(model: ServableModel, seed: int, n: int) -> np.ndarray:
    """(n, STEPS, features) inputs; with a Masking layer, some steps are masked."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, STEPS, model.n_features)).astype(np.float32)
    masked = mask_value(model)
    if masked is not None:
        xs[rng.random((n, STEPS)) < 0.3] = masked
    return xs


def _state_bytes(slot: Slot) -> list[bytes]:
    assert slot.tensors is not None
    return [np.ascontiguousarray(t, dtype=np.float32).tobytes() for t in slot.tensors]


def _alone(engine: Engine, xs: np.ndarray) -> Record:
    """Each sequence stepped alone (waves of one): per sequence and step, the
    output's bytes and the new state's."""
    ys: list[list[bytes]] = []
    states: list[list[list[bytes]]] = []
    for seq in xs:
        slot = Slot()
        ys.append([])
        states.append([])
        for x in seq:
            ys[-1].append(engine.step([slot], x[None])[0].tobytes())
            states[-1].append(_state_bytes(slot))
    return ys, states


def _layouts(rnd: random.Random) -> dict[str, Callable[[int], Sequence[int | None]]]:
    """Wave compositions, per step: the followed sequences' indices and None for
    a row of another sequence (its own input and state)."""
    seqs = list(range(SEQUENCES))

    def spread(size: int, step: int) -> Sequence[int | None]:
        places = rnd.sample(range(size), SEQUENCES)  # new places at every step
        wave: list[int | None] = [None] * size
        for k, p in zip(seqs, places, strict=True):
            wave[p] = k
        return wave

    return {
        "together": lambda step: list(seqs),
        "reversed": lambda step: seqs[::-1],
        "in a wave of 7": lambda step: [None, *seqs, None] if step % 2 else [*seqs, None, None],
        "in a wave of 64": lambda step: spread(64, step),
        "in a wave of 9 at new places": lambda step: spread(9, step),
        "in a wave of 1000": lambda step: spread(1000, step),
    }


def _step_waves(
    engine: Engine, xs: np.ndarray, layout: Callable[[int], Sequence[int | None]], others: np.ndarray
) -> Record:
    """The followed sequences stepped in the layout's waves, among other sequences."""
    slots = [Slot() for _ in range(SEQUENCES)]
    pool = [Slot() for _ in range(1000)]
    ys: list[list[bytes]] = [[] for _ in range(SEQUENCES)]
    states: list[list[list[bytes]]] = [[] for _ in range(SEQUENCES)]
    for step in range(STEPS):
        wave = layout(step)
        call = [slots[k] if k is not None else pool[i] for i, k in enumerate(wave)]
        x = np.stack(
            [xs[k, step] if k is not None else others[i % len(others), step] for i, k in enumerate(wave)]
        )
        y = engine.step(call, x)
        for i, k in enumerate(wave):
            if k is not None:
                ys[k].append(y[i].tobytes())
                states[k].append(_state_bytes(slots[k]))
    return ys, states


def _repeated_in_one_call(engine: Engine, xs: np.ndarray, others: np.ndarray) -> Record:
    """Every followed sequence twice per call (two steps at once, in sub-waves),
    among two other sequences: steps 0 and 1 in one call, 2 and 3 in the next."""
    slots = [Slot() for _ in range(SEQUENCES)]
    extra = [Slot(), Slot()]
    ys: list[list[bytes]] = [[] for _ in range(SEQUENCES)]
    states: list[list[list[bytes]]] = [[] for _ in range(SEQUENCES)]
    for step in range(0, STEPS, 2):
        call = [extra[0], *slots, *slots[::-1], extra[1]]
        rows = [others[0, step], *(xs[k, step] for k in range(SEQUENCES))]
        rows += [xs[k, step + 1] for k in reversed(range(SEQUENCES))]
        rows.append(others[1, step])
        y = engine.step(call, np.stack(rows))
        for k in range(SEQUENCES):
            ys[k] += [y[1 + k].tobytes(), y[2 * SEQUENCES - k].tobytes()]
            # Only the state after the second step is left: the first is checked by the second's output.
            states[k] += [[], _state_bytes(slots[k])]
    return ys, states


def _assert_identical(got: Record, want: Record, how: str) -> None:
    for k in range(SEQUENCES):
        for step in range(STEPS):
            assert got[0][k][step] == want[0][k][step], f"sequence {k} step {step} {how}: another output"
            if got[1][k][step]:
                assert got[1][k][step] == want[1][k][step], f"sequence {k} step {step} {how}: another state"


@pytest.mark.parametrize("kind", MODELS)
def test_fast_engine_repeats_are_identical(models: Callable[[str], ServableModel], kind: str) -> None:
    model = models(kind)
    engine = FastEngine(model)
    assert engine.identical_rows, "the self-test found no row blocks giving identical rows"
    xs = _inputs(model, 1, SEQUENCES)
    others = _inputs(model, 2, 1000)
    want = _alone(engine, xs)
    rnd = random.Random(3)
    for how, layout in _layouts(rnd).items():
        _assert_identical(_step_waves(engine, xs, layout, others), want, how)
    _assert_identical(_repeated_in_one_call(engine, xs, others), want, "repeated in one call")


def test_self_test_falls_back_to_single_rows(
    models: Callable[[str], ServableModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine where only single rows are identical: the self-test tries the
    candidates in order and serves with blocks of 1, whose repeats are identical."""
    calls: list[int] = []
    original = FastEngine.rows_identical

    def flaky(self: FastEngine, x: np.ndarray, states: list[np.ndarray]) -> bool:
        calls.append(self.plan.rows.block)
        return self.plan.rows.block == 1 and original(self, x, states)

    monkeypatch.setattr(FastEngine, "rows_identical", flaky)
    engine = FastEngine(models("wide"))
    assert calls == list(Rows.CANDIDATES)
    assert engine.plan.rows.block == 1 and engine.identical_rows
    xs = _inputs(engine.model, 1, SEQUENCES)
    want = _alone(engine, xs)
    others = _inputs(engine.model, 2, 1000)
    for how, layout in _layouts(random.Random(4)).items():
        _assert_identical(_step_waves(engine, xs, layout, others), want, how)


def test_self_test_reports_when_no_block_is_identical(
    models: Callable[[str], ServableModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FastEngine, "rows_identical", lambda self, x, states: False)
    engine = FastEngine(models("lstm_dense"))
    assert not engine.identical_rows
    assert engine.plan.rows.block == Rows.CANDIDATES[-1]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_and_row_means_do_not_depend_on_the_row_place(name: str) -> None:
    """What the products' blocks rely on: NumPy's element-wise kernels (SIMD
    bodies, masked or scalar tails) and a reduction along each row give a row
    the same bits at any offset in arrays of any length, widths that are not
    multiples of the SIMD width included. (The self-test checks it again on
    the serving machine, through the whole plan.)"""
    act = ACTIVATIONS[name]
    rng = np.random.default_rng(11)
    for width in (1, 3, 7, 13, 16, 17, 31, 33, 100):
        x = (rng.standard_normal((48, width)) * 4).astype(np.float32)
        alone = np.concatenate([act(x[i : i + 1].copy()) for i in range(len(x))])
        means = np.concatenate(
            [x[i : i + 1].mean(axis=1, keepdims=True, dtype=np.float32) for i in range(len(x))]
        )
        for n in (2, 5, 8, 9, 17, 33):
            for offset in (0, 1, 3, 7, 15):
                part = slice(offset, offset + n)
                assert act(x[part].copy()).tobytes() == alone[part].tobytes(), (width, n, offset)
                got = x[part].mean(axis=1, keepdims=True, dtype=np.float32)
                assert got.tobytes() == means[part].tobytes(), (width, n, offset)
