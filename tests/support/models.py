"""Small Keras models for the tests, built with a fixed seed and saved as `.keras`.

Each builder saves a stateless model (batch and time dimensions None unless said
otherwise) to `path` and returns the path. Weights are the seeded initialisation
plus a seeded perturbation, so biases are non-zero and every weight matters.
The models are tiny on purpose: the machine running the tests has 2 cores.

`built(kind)` builds each kind once per test process into a temporary directory
and returns the cached path: use it from module- or session-scoped fixtures.
`loaded_model(kind)` is that file loaded by lstmd (`load_model`, with its start-up
self-check), once per test process and shared by every test module.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
from keras import layers

from daemon.inference.model import ServableModel, load_model

SEED = 1234


def _finish(model: keras.Model, path: Path | str, seed: int = SEED) -> Path:
    """Perturb the weights deterministically, save, return the path."""
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0.0, 0.2, size=w.shape).astype(w.dtype) for w in model.get_weights()])
    path = Path(path)
    with warnings.catch_warnings():
        # Keras's own saving code trips NumPy 2's __array__(copy=...) deprecation.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="__array__")
        model.save(path)
    return path


def reweighted(model_path: Path, seed: int, path: Path) -> Path:
    """The model at `model_path` with other weights (each moved by N(0, 0.3), seeded):
    the same architecture, other outputs; a model B for a model change."""
    model = keras.saving.load_model(model_path, compile=False)
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0.0, 0.3, size=w.shape).astype(w.dtype) for w in model.get_weights()])
    path = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="__array__")
        model.save(path)
    return path


def _seed(seed: int = SEED) -> None:
    keras.utils.set_random_seed(seed)


# ------------------------------------------------------------------ servable models


def lstm_dense(path: Path | str, features: int = 1) -> Path:
    """The classic: Input -> LSTM(8) -> Dense(1, sigmoid)."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.LSTM(8),
            layers.Dense(1, activation="sigmoid"),
        ]
    )
    return _finish(model, path)


def stacked_lstm_gru(path: Path | str, features: int = 3, outputs: int = 2) -> Path:
    """LSTM(8, return_sequences=True) -> GRU(6) -> Dense(outputs)."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.LSTM(8, return_sequences=True),
            layers.GRU(6),
            layers.Dense(outputs),
        ]
    )
    return _finish(model, path)


def three_kinds(path: Path | str, features: int = 2) -> Path:
    """LSTM, GRU (reset_after=False, relu) and SimpleRNN (relu) stacked, all
    return_sequences=True, then Dropout, a per-step Dense(3) and an Activation:
    the output has a time axis."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.LSTM(6, return_sequences=True, recurrent_activation="hard_sigmoid"),
            layers.GRU(5, return_sequences=True, activation="relu", reset_after=False),
            layers.SimpleRNN(4, return_sequences=True, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(3),
            layers.Activation("tanh"),
        ]
    )
    return _finish(model, path)


def multi_output(path: Path | str, features: int = 2) -> Path:
    """Functional, two heads: a per-step Dense(2) on a GRU's sequence (time axis)
    and LSTM(4) -> Dense(1, sigmoid) on the same sequence (last step only)."""
    _seed()
    inp = keras.Input(shape=(None, features), name="x")
    seq = layers.GRU(5, return_sequences=True)(inp)
    per_step = layers.Dense(2, name="per_step")(seq)
    last = layers.LSTM(4)(seq)
    prob = layers.Dense(1, activation="sigmoid", name="prob")(last)
    model = keras.Model(inp, [per_step, prob])
    return _finish(model, path)


def fixed_shape(path: Path | str, features: int = 2) -> Path:
    """Built by calling it on a (4, 10, features) batch: the saved input has a
    fixed batch size and a fixed time length; still servable."""
    _seed()
    model = keras.Sequential([layers.GRU(4), layers.Dense(2)])
    model(np.zeros((4, 10, features), dtype=np.float32))
    return _finish(model, path)


def saved_stateful(path: Path | str, features: int = 2) -> Path:
    """Saved already stateful with batch size 1: still servable."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(batch_shape=(1, None, features)),
            layers.LSTM(4, stateful=True),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def exotic(path: Path | str, features: int = 2) -> Path:
    """Functional with dict outputs, a nested Sequential holding an LSTM, and a
    generic RNN over stacked cells (GRUCell, LSTMCell: nested states)."""
    _seed()
    inp = keras.Input(shape=(None, features))
    h = layers.Dense(4, activation="relu")(inp)
    inner = keras.Sequential(
        [keras.Input(shape=(None, 4)), layers.LSTM(3, return_sequences=True)], name="inner"
    )
    seq = inner(h)
    last = layers.RNN([layers.GRUCell(3), layers.LSTMCell(2)])(seq)
    model = keras.Model(inp, {"z_seq": layers.Dense(2)(seq), "a_last": layers.Dense(1)(last)})
    return _finish(model, path)


# ---------------------------------------------------------------- unservable models


def dense_only(path: Path | str, features: int = 3) -> Path:
    """No recurrent layer."""
    _seed()
    model = keras.Sequential([keras.Input(shape=(None, features)), layers.Dense(4), layers.Dense(1)])
    return _finish(model, path)


def bidirectional(path: Path | str, features: int = 2) -> Path:
    """A Bidirectional(LSTM)."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.Bidirectional(layers.LSTM(3)),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def go_backwards(path: Path | str, features: int = 2) -> Path:
    """An LSTM with go_backwards=True."""
    _seed()
    model = keras.Sequential(
        [keras.Input(shape=(None, features)), layers.LSTM(3, go_backwards=True), layers.Dense(1)]
    )
    return _finish(model, path)


def conv_same_before_lstm(path: Path | str, features: int = 2) -> Path:
    """A Conv1D with padding="same" (kernel 3) before the LSTM: its output at a
    step reads the next input."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.Conv1D(4, 3, padding="same"),
            layers.LSTM(3),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def conv_valid_before_lstm(path: Path | str, features: int = 2) -> Path:
    """A Conv1D with padding="valid" (kernel 2) before the LSTM: it shortens the sequence."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.Conv1D(4, 2, padding="valid"),
            layers.LSTM(3),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def causal_conv_lstm(path: Path | str, features: int = 2) -> Path:
    """Conv1D(causal, kernel 3, dilation 2) -> LSTM -> Dense: 4 past inputs as state."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.Conv1D(5, 3, padding="causal", dilation_rate=2, activation="relu"),
            layers.LSTM(4),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def tcn(path: Path | str, features: int = 3) -> Path:
    """A two-layer TCN-like stack, no recurrent layer: causal Conv1D (kernel 2,
    dilation 1) -> causal Conv1D (kernel 3, dilation 2) plus a residual
    one-step Conv1D of the input, a per-step Dense head (outputs with time)."""
    _seed()
    inp = keras.Input(shape=(None, features))
    h = layers.Conv1D(4, 2, padding="causal", activation="relu")(inp)
    h = layers.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="tanh")(h)
    skip = layers.Conv1D(4, 1)(inp)
    out = layers.Dense(2)(layers.Add()([h, skip]))
    return _finish(keras.Model(inp, out), path)


def pooling_over_time(path: Path | str, features: int = 2) -> Path:
    """An average over all time steps of an LSTM's sequence."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.LSTM(3, return_sequences=True),
            layers.GlobalAveragePooling1D(),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def two_inputs(path: Path | str, features: int = 2) -> Path:
    """Two sequence inputs concatenated before an LSTM."""
    _seed()
    a = keras.Input(shape=(None, features), name="a")
    b = keras.Input(shape=(None, features), name="b")
    h = layers.LSTM(3)(layers.Concatenate()([a, b]))
    model = keras.Model([a, b], layers.Dense(1)(h))
    return _finish(model, path)


def flat_input(path: Path | str) -> Path:
    """A rank-2 input (batch, 6) reshaped to (batch, 3, 2) before an LSTM."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(6,)),
            layers.Reshape((3, 2)),
            layers.LSTM(3),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


SERVABLE: dict[str, Callable[[Path], Path]] = {
    "lstm_dense": lstm_dense,
    "stacked_lstm_gru": stacked_lstm_gru,
    "three_kinds": three_kinds,
    "multi_output": multi_output,
    "fixed_shape": fixed_shape,
    "saved_stateful": saved_stateful,
    "exotic": exotic,
}

UNSERVABLE: dict[str, Callable[[Path], Path]] = {
    "dense_only": dense_only,
    "bidirectional": bidirectional,
    "go_backwards": go_backwards,
    "conv_same_before_lstm": conv_same_before_lstm,
    "conv_valid_before_lstm": conv_valid_before_lstm,
    "pooling_over_time": pooling_over_time,
    "two_inputs": two_inputs,
    "flat_input": flat_input,
}


@cache
def _cache_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="lstmd-test-models-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@cache
def built(kind: str) -> Path:
    """The path of the `kind` model, built once per test process."""
    builder = SERVABLE.get(kind) or UNSERVABLE[kind]
    return builder(_cache_dir() / f"{kind}.keras")


@cache
def loaded_model(kind: str) -> ServableModel:
    """`built(kind)` loaded by lstmd, once per test process: loading runs the
    self-check (most of a load's second or so), so the engine test modules share
    one ServableModel per kind. Engines own `model.stateful` and leave its state
    variables as they stepped them (KerasEngine assigns a slot's state before its
    first step): a test of a fresh load's own state calls `load_model` itself."""
    return load_model(built(kind))


# ------------------------------------------------- models for the fast engine's tests


def fast_mix(path: Path | str, features: int = 3) -> Path:
    """What the fast engine supports beyond the models above: a Dense(gelu) before
    the recurrent layers, a GRU without bias (reset_after=False), stacked
    SimpleRNNs (softsign without bias, selu), an LSTM without bias (relu,
    sigmoid), GaussianNoise, SpatialDropout1D, Activation(swish) and a
    Dense(softmax) head."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.Dense(4, activation="gelu"),
            layers.GRU(5, return_sequences=True, reset_after=False, use_bias=False),
            layers.SimpleRNN(4, return_sequences=True, activation="softsign", use_bias=False),
            layers.GaussianNoise(0.1),
            layers.SpatialDropout1D(0.2),
            layers.LSTM(3, return_sequences=True, activation="relu", use_bias=False),
            layers.SimpleRNN(4, activation="selu"),
            layers.Activation("swish"),
            layers.Dense(3, activation="softmax"),
        ]
    )
    return _finish(model, path)


def layer_norm(path: Path | str, features: int = 2) -> Path:
    """LSTM (return_sequences) -> LayerNormalization -> Dense."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.LSTM(4, return_sequences=True),
            layers.LayerNormalization(),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def time_distributed(path: Path | str, features: int = 2) -> Path:
    """GRU -> TimeDistributed(Dense)."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.GRU(3, return_sequences=True),
            layers.TimeDistributed(layers.Dense(2)),
        ]
    )
    return _finish(model, path)


def unit_norm(path: Path | str, features: int = 2) -> Path:
    """LSTM -> UnitNormalization -> Dense: servable, not by the fast engine."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.LSTM(4),
            # Named: the tests read the name, whatever was built before in the process.
            layers.UnitNormalization(name="unit_normalization"),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def prelu(path: Path | str, features: int = 2) -> Path:
    """GRU -> TimeDistributed(PReLU) -> Dense: servable, not by the fast engine."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.GRU(3, return_sequences=True),
            layers.TimeDistributed(layers.PReLU()),
            layers.Dense(2),
        ]
    )
    return _finish(model, path)


SERVABLE.update(
    {
        "fast_mix": fast_mix,
        "layer_norm": layer_norm,
        "time_distributed": time_distributed,
        "unit_norm": unit_norm,
        "prelu": prelu,
    }
)


# ------------------------------------------------------- the layer zoo (issue 10)
#
# Realistic small time-series models (3 features, LSTM(8)) built around the
# per-step layers both engines serve: normalizations, rescaling, TimeDistributed,
# a last recurrent layer returning sequences, masking and merges of branches.


def _training_data(features: int = 3, seed: int = SEED) -> np.ndarray:
    """(64, 5, features) float32 with per-feature offsets and scales, to adapt on."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.5, 3.0, features, dtype=np.float32)
    offset = np.linspace(-2.0, 4.0, features, dtype=np.float32)
    return (rng.standard_normal((64, 5, features)).astype(np.float32) * scale + offset).astype(np.float32)


def normalized(path: Path | str, features: int = 3) -> Path:
    """The issue's model: Normalization (adapted) -> LSTM(8) -> LayerNormalization -> Dense(1)."""
    _seed()
    norm = layers.Normalization()
    norm.adapt(_training_data(features))
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            norm,
            layers.LSTM(8),
            layers.LayerNormalization(),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def scaled_sequences(path: Path | str, features: int = 3) -> Path:
    """Normalization with mean and variance given, Rescaling, a last GRU with
    return_sequences=True, LayerNormalization (axis=2, no center, epsilon 0.01),
    TimeDistributed(Dense(2)) and an adapted Normalization(invert=True) on the
    output: the output has a time axis."""
    _seed()
    target = layers.Normalization(invert=True)
    target.adapt(_training_data(2, seed=SEED + 1))
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.Normalization(mean=[1.0, -2.0, 0.5][:features], variance=[4.0, 0.25, 1.0][:features]),
            layers.Rescaling(0.5, offset=0.1),
            layers.GRU(8, return_sequences=True),
            layers.LayerNormalization(axis=2, center=False, epsilon=1e-2),
            layers.TimeDistributed(layers.Dense(2, activation="tanh")),
            target,
        ]
    )
    return _finish(model, path)


def batch_normalized(path: Path | str, features: int = 3) -> Path:
    """BatchNormalization (moving statistics) before and after a stacked LSTM whose
    last layer returns sequences, TimeDistributed(Dense(1)) and a Rescaling."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.BatchNormalization(),
            layers.LSTM(8, return_sequences=True),
            layers.SimpleRNN(4, return_sequences=True),
            layers.BatchNormalization(center=False, epsilon=0.01),
            layers.TimeDistributed(layers.Dense(1)),
            layers.Rescaling(10.0),
        ]
    )
    return _finish(model, path)


def merged(path: Path | str, features: int = 3) -> Path:
    """Branches of the one input merged element-wise: Add, Multiply, Average and a
    Concatenate on the last axis of two heads (per step and last step)."""
    _seed()
    inp = keras.Input(shape=(None, features))
    norm = layers.LayerNormalization()(inp)
    skip = layers.Dense(8)(inp)
    seq = layers.LSTM(8, return_sequences=True)(norm)
    added = layers.Add()([seq, skip])
    gated = layers.Multiply()([added, layers.Dense(8, activation="sigmoid")(inp)])
    mean = layers.Average()([gated, seq, skip])
    last = layers.GRU(4)(mean)
    both = layers.Concatenate()([last, layers.Dense(2)(last)])
    per_step = layers.Concatenate(axis=-1)([layers.Dense(2)(mean), inp])
    model = keras.Model(inp, [layers.Dense(1)(both), per_step])
    return _finish(model, path)


#: The value of a masked step in the masked models' inputs (masked_merged: -1).
MASK_VALUE = 0.0


def masked(path: Path | str, features: int = 3) -> Path:
    """Masking (steps of all zeros) -> LSTM(8) -> Dense(1)."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.Masking(mask_value=MASK_VALUE),
            layers.LSTM(8),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


def masked_sequences(path: Path | str, features: int = 3) -> Path:
    """Masking -> GRU(8, return_sequences=True) -> SimpleRNN(4, return_sequences=True)
    -> Dense(2): the mask flows through two recurrent layers to a per-step head."""
    _seed()
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            layers.Masking(mask_value=MASK_VALUE),
            layers.GRU(8, return_sequences=True),
            layers.SimpleRNN(4, return_sequences=True),
            layers.Dense(2),
        ]
    )
    return _finish(model, path)


def masked_merged(path: Path | str, features: int = 3) -> Path:
    """Masking (mask_value -1) feeding two branches merged by Add: a Dense -> LSTM(8)
    with zero_output_for_mask=True (masked steps output zeros) and a Dense(8);
    then an RNN over stacked GRU and LSTM cells (nested states) -> Dense(1)."""
    _seed()
    inp = keras.Input(shape=(None, features))
    masked = layers.Masking(mask_value=-1.0)(inp)
    seq = layers.LSTM(8, return_sequences=True, zero_output_for_mask=True)(layers.Dense(4)(masked))
    added = layers.Add()([seq, layers.Dense(8)(masked)])
    last = layers.RNN([layers.GRUCell(4), layers.LSTMCell(3)])(added)
    return _finish(keras.Model(inp, layers.Dense(1)(last)), path)


def global_normalized(path: Path | str, features: int = 3) -> Path:
    """Normalization(axis=None) (one adapted mean and variance for all features) ->
    LSTM(8) -> Rescaling with per-unit scale and offset -> BatchNormalization -> Dense(1)."""
    _seed()
    norm = layers.Normalization(axis=None)
    norm.adapt(_training_data(features))
    model = keras.Sequential(
        [
            keras.Input(shape=(None, features)),
            norm,
            layers.LSTM(8),
            layers.Rescaling([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0], offset=[0.1] * 8),
            layers.BatchNormalization(),
            layers.Dense(1),
        ]
    )
    return _finish(model, path)


ZOO: dict[str, Callable[[Path], Path]] = {
    "causal_conv_lstm": causal_conv_lstm,
    "tcn": tcn,
    "masked_merged": masked_merged,
    "global_normalized": global_normalized,
    "normalized": normalized,
    "scaled_sequences": scaled_sequences,
    "batch_normalized": batch_normalized,
    "merged": merged,
    "masked": masked,
    "masked_sequences": masked_sequences,
}
SERVABLE.update(ZOO)
