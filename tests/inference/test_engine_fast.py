"""What only FastEngine does: against KerasEngine and the oracle (tests/oracle.py) at
1e-5 over many sequences and in sub-waves; its activations against Keras's;
make_engine's choice and fallback. The engine contract is checked on it in
tests/inference/test_engine_contract.py."""

from __future__ import annotations

import random
import typing
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import orjson
import pytest
import structlog

from daemon.core.processor import Processor
from daemon.core.state import StateStore
from daemon.inference import tolerance
from daemon.inference.engines.contract import StateSlot, parity_guard
from daemon.inference.engines.factory import make_engine
from daemon.inference.engines.fast import ACTIVATIONS, FastEngine, UnsupportedModel, numpy_activation
from daemon.inference.engines.keras import KerasEngine
from daemon.inference.model import ServableModel, load_model
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord
from tests.oracle import assert_matches, expected_outputs
from tests.support.engine_runs import KINDS, random_calls
from tests.support.fakes import Slot
from tests.support.models import built, loaded_model

FALLBACK = {
    "unit_norm": ("unit_normalization", "UnitNormalization"),
    "prelu": ("p_re_lu", "PReLU"),
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, ServableModel]:
    return {kind: loaded_model(kind) for kind in [*KINDS, *FALLBACK]}


@pytest.mark.parametrize("kind", KINDS)
def test_many_sequences_match_keras(loaded: dict[str, ServableModel], kind: str) -> None:
    """40 sequences, ~250 events in calls of up to 40 with repeats and resets:
    outputs and states equal KerasEngine's."""
    model = loaded[kind]
    fast, ref = FastEngine(model), KerasEngine(model)
    rng = np.random.default_rng(5)
    ours = [Slot() for _ in range(40)]
    theirs = [Slot() for _ in range(40)]
    for call, resets in random_calls(random.Random(5), 40, (2, 10), 40):
        for k in resets:
            ours[k].tensors = theirs[k].tensors = None
        xs = rng.standard_normal((len(call), model.n_features)).astype(np.float32)
        got = fast.step([ours[k] for k in call], xs)
        want = ref.step([theirs[k] for k in call], xs)
        assert_matches(got, want)
    assert fast.waves < fast.steps  # sequences were stepped together
    for a, b in zip(ours, theirs, strict=True):
        assert (a.tensors is None) == (b.tensors is None)
        if a.tensors is not None and b.tensors is not None:
            assert [t.shape for t in a.tensors] == [t.shape for t in b.tensors]
            for x, y in zip(a.tensors, b.tensors, strict=True):
                assert_matches(x, y)


def test_repeated_slots_are_sub_waves(loaded: dict[str, ServableModel]) -> None:
    model = loaded["stacked_lstm_gru"]
    engine = FastEngine(model)
    xs = np.random.default_rng(7).standard_normal((7, model.n_features)).astype(np.float32)
    a, b, c = Slot(), Slot(), Slot()
    # a: events 0, 2, 3, 6; b: 1, 5; c: 4 -> sub-waves {0, 1, 4}, {2, 5}, {3}, {6}
    ys = engine.step([a, b, a, a, c, b, a], xs)
    assert engine.waves == 4
    oracle = built("stacked_lstm_gru")
    assert_matches(ys[[0, 2, 3, 6]], expected_outputs(oracle, xs[[0, 2, 3, 6]]))
    assert_matches(ys[[1, 5]], expected_outputs(oracle, xs[[1, 5]]))
    assert_matches(ys[[4]], expected_outputs(oracle, xs[[4]]))


def test_states_are_interchangeable_with_keras(loaded: dict[str, ServableModel]) -> None:
    """A state left by one engine continues in the other: same layout, same values."""
    model = loaded["multi_output"]
    fast, ref = FastEngine(model), KerasEngine(model)
    x = np.random.default_rng(10).standard_normal((9, model.n_features)).astype(np.float32)
    slot = Slot()
    ys = [fast.step([slot] * 3, x[:3]), ref.step([slot] * 3, x[3:6]), fast.step([slot] * 3, x[6:])]
    assert_matches(np.concatenate(ys), expected_outputs(built("multi_output"), x))


# ------------------------------------------------------------------ activations

_GRID = (
    np.concatenate(
        [
            np.linspace(-12, 12, 96),
            [-30.0, -1.0, -0.5, -1e-3, 1e-3, 0.5, 1.0, 30.0, 0.0, 3.0, -3.0, 6.0, 1e-6, -1e-6],
        ]
    )
    .astype(np.float32)
    .reshape(-1, 5)
)  # (n, 5) rows: softmax works over the last axis


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_keras(name: str) -> None:
    fn = keras.activations.get(name)
    x = _GRID if name not in ("exponential",) else np.clip(_GRID, -12, 12)
    want = np.asarray(fn(keras.ops.convert_to_tensor(x)), dtype=np.float64)
    got = numpy_activation(fn, "test")(x.copy())  # implementations may overwrite their input
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_unknown_activations_are_refused() -> None:
    with pytest.raises(UnsupportedModel, match="my_act"):
        numpy_activation(lambda x: x, "layer 'my_act' (Dense)")
    with pytest.raises(UnsupportedModel, match="activation 'glu'"):
        numpy_activation(keras.activations.get("glu"), "a layer")


# keras is untyped here (ignore_missing_imports), so is its decorator.
@keras.saving.register_keras_serializable(package="lstmd_tests")  # type: ignore[untyped-decorator]
def wobble(x: object) -> object:
    """A custom activation: Keras serves it, the fast engine does not know it."""
    return keras.ops.tanh(x) * 0.5


def test_custom_activation_falls_back(tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    net = keras.Sequential(
        [keras.Input((None, 2)), keras.layers.GRU(3, activation=wobble, name="odd"), keras.layers.Dense(1)]
    )
    net.save(tmp_path / "custom.keras")
    model = load_model(tmp_path / "custom.keras")
    with pytest.raises(UnsupportedModel, match=r"layer 'odd' \(GRU\) has the activation 'wobble'"):
        FastEngine(model)
    engine, reason = make_engine("fast", model)
    assert isinstance(engine, KerasEngine) and reason is not None and "wobble" in reason


# ------------------------------------------------------------------ make_engine


def test_make_engine_by_name(loaded: dict[str, ServableModel]) -> None:
    model = loaded["multi_output"]
    engine, reason = make_engine("keras", model)
    assert isinstance(engine, KerasEngine) and reason is None
    engine, reason = make_engine("fast", model)
    assert isinstance(engine, FastEngine) and reason is None
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("turbo", model)


@pytest.mark.parametrize("kind", sorted(FALLBACK))
def test_unsupported_layer_falls_back_to_keras(loaded: dict[str, ServableModel], kind: str) -> None:
    model = loaded[kind]
    engine, reason = make_engine("fast", model)
    assert isinstance(engine, KerasEngine)
    name, cls = FALLBACK[kind]
    assert reason is not None and f"'{name}'" in reason and f"({cls})" in reason
    # The Keras engine it got serves the model exactly.
    x = np.random.default_rng(2).standard_normal((4, model.n_features)).astype(np.float32)
    slot = Slot()
    assert_matches(engine.step([slot] * 4, x), expected_outputs(built(kind), x))


class _Off(FastEngine):
    """A fast engine with a small error in its outputs."""

    def step(self, slots: Sequence[StateSlot], xs: np.ndarray) -> np.ndarray:
        return super().step(slots, xs) + np.float32(1e-3)


def test_parity_guard_catches_a_difference(
    loaded: dict[str, ServableModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = loaded["lstm_dense"]
    assert parity_guard(FastEngine(model), KerasEngine(model), model) is None
    reason = parity_guard(_Off(model), KerasEngine(model), model)
    assert reason is not None and "differs" in reason and "0.001" in reason
    monkeypatch.setattr("daemon.inference.engines.fast.FastEngine", _Off)
    engine, reason = make_engine("fast", model)
    assert isinstance(engine, KerasEngine)
    assert reason is not None and reason.startswith("start-up parity check failed")


def test_parity_guard_reports_a_failing_engine(loaded: dict[str, ServableModel]) -> None:
    model = loaded["lstm_dense"]

    class Broken(FastEngine):
        def step(self, slots: Sequence[StateSlot], xs: np.ndarray) -> np.ndarray:
            raise RuntimeError("boom")

    reason = parity_guard(Broken(model), KerasEngine(model), model)
    assert reason is not None and "RuntimeError: boom" in reason


def test_one_tolerance_is_the_oracles() -> None:
    # The guard and the model's self-check both use daemon/inference/tolerance.py.
    assert tolerance.ATOL == tolerance.RTOL == 1e-5


# ------------------------------------------------------------------ wiring


def test_build_processor_logs_the_fallback() -> None:
    from daemon.pipeline import build_processor

    with structlog.testing.capture_logs() as logs:
        processor = build_processor(built("unit_norm"), "fast", Metrics())
    assert processor.engine.name == "keras"
    refused = [e for e in logs if e["event"] == "fast_engine_refused"]
    assert len(refused) == 1 and refused[0]["log_level"] == "warning"
    assert "UnitNormalization" in refused[0]["reason"]
    with structlog.testing.capture_logs() as logs:
        processor = build_processor(built("lstm_dense"), "fast", Metrics())
    assert processor.engine.name == "fast"
    assert not [e for e in logs if e["event"] == "fast_engine_refused"]


def test_replay_and_config_accept_fast() -> None:
    from daemon.cli import parser
    from daemon.config import Settings

    args = parser().parse_args(["replay", "--model", "m.keras", "--input", "i", "--engine", "fast"])
    assert args.engine == "fast"
    # No flag: LSTMD_ENGINE decides, else keras (tests/pod/test_inspect_and_replay.py).
    assert parser().parse_args(["replay", "--model", "m.keras", "--input", "i"]).engine is None
    assert "fast" in typing.get_args(Settings.model_fields["engine"].annotation)


def test_processor_with_the_fast_engine_matches_the_oracle(loaded: dict[str, ServableModel]) -> None:
    """The processor's waves through the fast engine: every prediction is the oracle's."""
    kind = "stacked_lstm_gru"
    model = loaded[kind]
    proc = Processor(
        FastEngine(model), model_id="m@0", n_features=model.n_features, store=StateStore(), metrics=Metrics()
    )
    rnd = random.Random(4)
    rng = np.random.default_rng(4)
    seqs: dict[str, list[np.ndarray]] = {f"s{i}": [] for i in range(6)}
    records, keys = [], []
    for offset in range(60):
        key = rnd.choice(sorted(seqs))
        x = rng.standard_normal(model.n_features).astype(np.float32)
        seqs[key].append(x)
        keys.append((key, len(seqs[key]) - 1))
        value = orjson.dumps({"x": [float(v) for v in x]})
        records.append(FileRecord("in", 0, offset, 0, key.encode(), value))
    outputs = [o for batch in (records[:25], records[25:]) for o in proc.process(batch)]
    assert len(outputs) == 60 and not any(o.dead_letter for o in outputs)
    expected = {k: expected_outputs(built(kind), np.stack(v)) for k, v in seqs.items() if v}
    got = np.array([orjson.loads(o.value or b"")["y"] for o in outputs])
    want = np.stack([expected[k][t] for k, t in keys])
    assert_matches(got, want)
