"""Real Keras 2 model files, written with the Keras 2 API (tf_keras), and their oracle.

Each fixture is written by tf_keras in a subprocess of its own, never in the
test process: there Keras 3 is imported, and `tf.keras` (and TensorFlow's
Keras globals) resolve to one Keras or the other depending on import order
and TF_USE_LEGACY_KERAS. A subprocess keeps the files exactly what a tf.keras
2.x user writes.

`expected_outputs` is the oracle of tests/oracle.py for these files, evaluated
by the Keras 2 model itself (loaded with tf_keras.models.load_model, in a
subprocess), never by the copy lstmd builds from the file.

Both are kept on disk outside the work tree (`cache_root`, like the Kafka jars):
the files under a key of the writer's source and the versions of Python,
TensorFlow, tf_keras, h5py and NumPy; each oracle answer under a key of the
oracle's source, those versions, the model file's bytes and the inputs' bytes.
A fresh machine (or a new version of any of them) writes and evaluates them once;
a test session copies the files into a directory of its own (`written`).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from functools import cache
from importlib.metadata import version
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

def last(out):
    parts = []
    for o in tf.nest.flatten(out):  # keras.tree.flatten's order
        a = np.asarray(o, dtype=np.float64)
        parts.append((a[:, -1] if a.ndim == 3 else a).reshape(a.shape[0], -1))
    return np.concatenate(parts, axis=1)

# Arguments: (model file, inputs .npz, outputs .npz) triples.
for model_path, inputs, outputs in zip(*[iter(sys.argv[1:])] * 3, strict=True):
    model = keras.models.load_model(model_path, compile=False)
    seqs = np.load(inputs)
    xs = [seqs[f"arr_{i}"] for i in range(len(seqs.files))]
    shape = model.inputs[0].shape
    stateful = [l for l in model.layers if getattr(l, "stateful", False)]
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
    np.savez(outputs, *results)
"""


def _run(script: str, *args: str) -> None:
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_USE_LEGACY_KERAS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, timeout=300, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the tf_keras subprocess failed:\n{proc.stderr.decode()[-3000:]}")


def cache_root() -> Path:
    """Where written files and oracle answers are kept: outside the work tree."""
    return Path.home() / ".cache" / "lstmd" / "test-keras2"


def _key(*parts: str | bytes) -> str:
    """A digest of `parts` and of everything else that shapes a file or an answer."""
    versions = [f"python {sys.version_info.major}.{sys.version_info.minor}"]
    versions += [f"{dist} {version(dist)}" for dist in ("tensorflow", "tf-keras", "h5py", "numpy")]
    digest = hashlib.sha256()
    for part in [*versions, *parts]:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:32]


def _scratch() -> Path:
    """A new directory beside the kept ones, to fill before it is renamed into place."""
    cache_root().mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".scratch-", dir=cache_root()))


@cache
def written() -> Path:
    """The directory of every fixture, a copy of the kept files made once per test
    session: the servable ones (SERVABLE), bidirectional.h5, saved_model_dir/ (a
    TensorFlow SavedModel) and weights_only.h5 (model.save_weights)."""
    kept = cache_root() / f"files-{_key(_WRITER)}"
    if not kept.is_dir():
        scratch = _scratch()
        try:
            _run(_WRITER, str(scratch))
            try:
                scratch.rename(kept)
            except OSError:
                if not kept.is_dir():  # another session's rename came first: use its files
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix="lstmd-test-keras2-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    shutil.copytree(kept, path, dirs_exist_ok=True)
    return path


def fixture(name: str) -> Path:
    return written() / name


def expected_outputs(model_path: Path, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The oracle's (T, output_width) float64 rows for each (T, F) sequence, computed
    by the Keras 2 model in `model_path` itself, in a tf_keras subprocess (kept on disk)."""
    (rows,) = expected_outputs_of([(model_path, sequences)])
    return rows


def expected_outputs_of(
    requests: Sequence[tuple[Path, Sequence[np.ndarray]]],
) -> list[list[np.ndarray]]:
    """`expected_outputs` of several (model file, sequences) requests: those not kept
    yet are evaluated together, in one tf_keras subprocess."""
    answers: list[Path] = []
    missing: list[tuple[Path, list[np.ndarray], Path]] = []
    for model_path, sequences in requests:
        xs = [np.asarray(s, dtype=np.float32) for s in sequences]
        inputs = b"".join(str(x.shape).encode() + x.tobytes() for x in xs)
        answer = cache_root() / "oracle" / f"{_key(_ORACLE, Path(model_path).read_bytes(), inputs)}.npz"
        answers.append(answer)
        if not answer.exists():
            missing.append((Path(model_path), xs, answer))
    if missing:
        scratch = _scratch()
        try:
            args = []
            for i, (model_path, xs, _) in enumerate(missing):
                np.savez(scratch / f"in{i}.npz", *xs)  # arr_0, arr_1, ...
                args += [str(model_path), str(scratch / f"in{i}.npz"), str(scratch / f"out{i}.npz")]
            _run(_ORACLE, *args)
            for i, (_, _, answer) in enumerate(missing):
                answer.parent.mkdir(exist_ok=True)
                (scratch / f"out{i}.npz").replace(answer)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    out = []
    for answer, (_, sequences) in zip(answers, requests, strict=True):
        with np.load(answer) as got:
            out.append([got[f"arr_{i}"] for i in range(len(sequences))])
    return out
