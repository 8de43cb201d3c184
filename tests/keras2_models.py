"""Real Keras 2 model files, written with the Keras 2 API (tf_keras), and their oracle.

Each fixture is written by tf_keras in a subprocess of its own, never in the
test process: there Keras 3 is imported, and `tf.keras` (and TensorFlow's
Keras globals) resolve to one Keras or the other depending on import order
and TF_USE_LEGACY_KERAS. A subprocess keeps the files exactly what a tf.keras
2.x user writes. The files are written once per test session (`written`).

`expected_outputs` is the oracle of tests/oracle.py for these files, evaluated
by the Keras 2 model itself (loaded with tf_keras.models.load_model, in a
subprocess), never by the copy lstmd builds from the file.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

#: The servable fixtures: file name -> (features, output width).
SERVABLE = {
    "stateful_recipe.h5": (1, 1),
    "stateful_recipe_old_layout.h5": (1, 1),
    "stacked_stateless.h5": (3, 2),
}

_WRITER = r"""
import json, os, sys
import numpy as np
import h5py
import tf_keras as keras

out = sys.argv[1]
keras.utils.set_random_seed(7)
rng = np.random.default_rng(7)

# The classic stateful recipe: batch 1, one step, trained with resets between sequences.
m = keras.Sequential([
    keras.layers.LSTM(10, batch_input_shape=(1, 1, 1), stateful=True),
    keras.layers.Dense(1, activation="sigmoid"),
])
m.compile(loss="mse", optimizer="adam")
for _ in range(4):
    for _ in range(5):
        m.train_on_batch(rng.normal(size=(1, 1, 1)), rng.random((1, 1)))
    m.reset_states()
m.save(os.path.join(out, "stateful_recipe.h5"))

# The same file as Keras <= 2.3 laid it out: no InputLayer, the first layer
# carrying batch_input_shape (the weights are the same bytes).
old = os.path.join(out, "stateful_recipe_old_layout.h5")
m.save(old)
with h5py.File(old, "r+") as f:
    config = json.loads(f.attrs["model_config"])
    layers = config["config"]["layers"]
    assert layers[0]["class_name"] == "InputLayer", layers[0]
    config["config"]["layers"] = layers[1:]
    f.attrs["model_config"] = json.dumps(config)

# Stateless, stacked kinds, trained with whole sequences.
i = keras.Input(shape=(None, 3))
h = keras.layers.LSTM(8, return_sequences=True)(i)
h = keras.layers.GRU(4)(h)
s = keras.Model(i, keras.layers.Dense(2)(h))
s.compile(loss="mse", optimizer="adam")
s.train_on_batch(rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 2)))
s.save(os.path.join(out, "stacked_stateless.h5"))

b = keras.Sequential([
    keras.Input(shape=(None, 2)),
    keras.layers.Bidirectional(keras.layers.LSTM(3)),
    keras.layers.Dense(1),
])
b.save(os.path.join(out, "bidirectional.h5"))

s.save(os.path.join(out, "saved_model_dir"), save_format="tf")
s.save_weights(os.path.join(out, "weights_only.h5"))
"""

_ORACLE = r"""
import sys
import numpy as np
import tensorflow as tf
import tf_keras as keras

model = keras.models.load_model(sys.argv[1], compile=False)
seqs = np.load(sys.argv[2])
xs = [seqs[f"arr_{i}"] for i in range(len(seqs.files))]
shape = model.inputs[0].shape
stateful = [l for l in model.layers if getattr(l, "stateful", False)]

def last(out):
    parts = []
    for o in tf.nest.flatten(out):  # keras.tree.flatten's order
        a = np.asarray(o, dtype=np.float64)
        parts.append((a[:, -1] if a.ndim == 3 else a).reshape(a.shape[0], -1))
    return np.concatenate(parts, axis=1)

results = []
for x in xs:
    if shape[1] is None:
        # Stateless: the model applied to each prefix on its own.
        rows = []
        for t in range(len(x)):
            for layer in stateful:
                layer.reset_states()
            rows.append(last(model(x[None, : t + 1], training=False))[0])
    else:
        # A model saved for one step at a time (the stateful recipe) takes no
        # longer prefix: from a reset state it is fed the prefix step by step,
        # the way it was trained, and its output at step t is that of x[: t + 1].
        assert shape[1] == 1 and stateful, shape
        model.reset_states()
        rows = [last(model(x[None, t : t + 1], training=False))[0] for t in range(len(x))]
    results.append(np.stack(rows) if rows else np.zeros((0, 0)))
np.savez(sys.argv[3], *results)
"""


def _run(script: str, *args: str) -> None:
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, timeout=300, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the tf_keras subprocess failed:\n{proc.stderr.decode()[-3000:]}")


@cache
def written() -> Path:
    """The directory of every fixture, written once per test session: the
    servable ones (SERVABLE), bidirectional.h5, saved_model_dir/ (a TensorFlow
    SavedModel) and weights_only.h5 (model.save_weights)."""
    path = Path(tempfile.mkdtemp(prefix="lstmd-test-keras2-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    _run(_WRITER, str(path))
    return path


def fixture(name: str) -> Path:
    return written() / name


_expected: dict[tuple[str, str], list[np.ndarray]] = {}


def expected_outputs(model_path: Path, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """The oracle's (T, output_width) float64 rows for each (T, F) sequence, computed
    by the Keras 2 model in `model_path` itself, in a tf_keras subprocess (cached
    per file and inputs)."""
    xs = [np.asarray(s, dtype=np.float32) for s in sequences]
    digest = hashlib.sha256(b"".join(x.tobytes() + str(x.shape).encode() for x in xs)).hexdigest()
    key = (str(model_path), digest)
    if key not in _expected:
        with tempfile.TemporaryDirectory(prefix="lstmd-keras2-oracle-") as tmp:
            inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
            np.savez(inputs, *xs)  # arr_0, arr_1, ...
            _run(_ORACLE, str(model_path), str(inputs), str(outputs))
            with np.load(outputs) as got:
                _expected[key] = [got[f"arr_{i}"] for i in range(len(xs))]
    return _expected[key]
