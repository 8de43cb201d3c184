"""daemon.inference.model: loading, refusing, the stateful copy and its start-up self-check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest

from daemon.errors import StartupError, UnservableModelError
from daemon.inference.model import ModelIdentity, ServableModel, last_step_output, load_model, verify
from tests.oracle import assert_matches, expected_outputs
from tests.support.models import built

# kind -> (n_features, output_width, state_shapes, layer_kinds)
SERVABLE = {
    "lstm_dense": (1, 1, [(8,), (8,)], ["LSTM", "Dense"]),
    "stacked_lstm_gru": (3, 2, [(8,), (8,), (6,)], ["LSTM", "GRU", "Dense"]),
    "three_kinds": (
        2,
        3,
        [(6,), (6,), (5,), (4,)],
        ["LSTM", "GRU", "SimpleRNN", "Dropout", "Dense", "Activation"],
    ),
    "multi_output": (2, 3, [(5,), (4,), (4,)], ["GRU", "LSTM", "Dense", "Dense"]),
    "fixed_shape": (2, 2, [(4,)], ["GRU", "Dense"]),
    "saved_stateful": (2, 1, [(4,), (4,)], ["LSTM", "Dense"]),
    "exotic": (
        2,
        3,
        [(3,), (3,), (3,), (2,), (2,)],
        ["Dense", "Sequential", "LSTM", "RNN", "Dense", "Dense"],
    ),
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, ServableModel]:
    return {kind: load_model(built(kind)) for kind in SERVABLE}


@pytest.mark.parametrize("kind", list(SERVABLE))
def test_load_model_describes_the_model(loaded: dict[str, ServableModel], kind: str) -> None:
    model = loaded[kind]
    n_features, width, shapes, kinds = SERVABLE[kind]
    assert model.n_features == n_features
    assert model.output_width == width
    assert model.state_shapes == shapes
    assert model.layer_kinds == kinds
    assert tuple(model.stateful.inputs[0].shape) == (1, 1, n_features)
    assert [type(layer).__name__ for layer in model.stateful_layers] == [
        k for k in kinds if k in ("LSTM", "GRU", "SimpleRNN", "RNN")
    ]
    assert all(layer.stateful for layer in model.stateful_layers)
    assert all(not layer.stateful for layer in model.stateless.layers if isinstance(layer, keras.layers.RNN))
    for a, b in zip(model.stateful.get_weights(), model.stateless.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # The self-check leaves every state at zero.
    assert len(model.state_variables) == len(model.state_shapes)
    for var in model.state_variables:
        assert not np.any(var.numpy())


def test_identity_is_stem_and_sha256(loaded: dict[str, ServableModel]) -> None:
    path = built("lstm_dense")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded["lstm_dense"].identity == ModelIdentity("lstm_dense", digest)
    assert str(loaded["lstm_dense"].identity) == f"lstm_dense@{digest[:12]}"


def test_load_model_accepts_str_path() -> None:
    assert load_model(str(built("lstm_dense"))).n_features == 1


@pytest.mark.parametrize("kind", list(SERVABLE))
def test_last_step_output_matches_the_oracle(loaded: dict[str, ServableModel], kind: str) -> None:
    model = loaded[kind]
    x = np.random.default_rng(3).standard_normal((6, model.n_features)).astype(np.float32)
    got = np.stack([last_step_output(model, x[: t + 1]) for t in range(len(x))])
    assert got.dtype == np.float32
    assert_matches(got, expected_outputs(built(kind), x))


@pytest.mark.parametrize("kind", list(SERVABLE))
def test_stateful_copy_stepped_matches_the_oracle(loaded: dict[str, ServableModel], kind: str) -> None:
    model = loaded[kind]
    x = np.random.default_rng(4).standard_normal((7, model.n_features)).astype(np.float32)
    model.reset_states()
    try:
        got = np.stack(
            [
                model.flatten_step_outputs(model.stateful.predict_on_batch(x[t].reshape(1, 1, -1)))
                for t in range(len(x))
            ]
        )
    finally:
        model.reset_states()
    assert_matches(got, expected_outputs(built(kind), x))


def test_verify_passes_again(loaded: dict[str, ServableModel]) -> None:
    verify(loaded["stacked_lstm_gru"], steps=8, seed=5)


REFUSED = {
    "dense_only": "no recurrent layer",
    "bidirectional": "Bidirectional",
    "go_backwards": "go_backwards=True",
    "conv_same_before_lstm": "has padding='same': it centres its kernel",
    "conv_valid_before_lstm": "has padding='valid': it shortens the sequence",
    "pooling_over_time": "not causal step by step",
    "two_inputs": "2 inputs",
    "flat_input": "rank 2",
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unservable_models_are_refused_with_the_reason(kind: str) -> None:
    path = built(kind)
    with pytest.raises(UnservableModelError) as info:
        load_model(path)
    message = str(info.value)
    assert REFUSED[kind] in message
    assert str(path) in message
    assert isinstance(info.value, StartupError) and info.value.exit_code == 2


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnservableModelError, match="no such file"):
        load_model(tmp_path / "nope.keras")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnservableModelError, match="is a directory, not a model file"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["garbage.keras", "garbage.h5"])
def test_not_a_keras_model_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(UnservableModelError, match="not a loadable Keras model") as info:
        load_model(path)
    assert name in str(info.value)


def test_another_format_is_refused_saying_how_to_convert(tmp_path: Path) -> None:
    path = tmp_path / "garbage.txt"
    path.write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(UnservableModelError, match=r"\.txt is not a model format lstmd reads") as info:
        load_model(path)
    assert "garbage.txt" in str(info.value) and 'model.save("m.keras")' in str(info.value)


def test_the_batched_oracle_is_the_oracle() -> None:
    """expected_outputs_many only groups equal-length prefixes: same values (on
    every model the engine contract checks against it, and a stateful one)."""
    from tests.oracle import expected_outputs, expected_outputs_many, load_reference
    from tests.support.engine_runs import KINDS

    rng = np.random.default_rng(5)
    for kind in sorted({*KINDS, "saved_stateful"}):
        path = built(kind)
        features = load_reference(path).inputs[0].shape[-1]
        seqs = [rng.normal(size=(n, features)).astype(np.float32) for n in (1, 4, 7, 4)]
        for many, one in zip(expected_outputs_many(path, seqs), seqs, strict=True):
            assert_matches(many, expected_outputs(path, one), atol=1e-6)
