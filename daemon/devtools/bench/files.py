"""The files a run makes, in one temporary directory removed at exit: the
benchmark models (saved once per process, so that every section and round
loads the same file) and the peer's weights and state directories.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

from daemon.devtools.bench.config import ModelSpec


@cache
def model_file(spec: ModelSpec) -> Path:
    """The spec's model, seeded and saved once per process in a temporary
    directory removed at exit."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(1234)
    rng = np.random.default_rng(1234)
    if spec.layers == "lstm":
        model = keras.Sequential(
            [
                keras.Input(shape=(None, spec.features)),
                keras.layers.LSTM(spec.units),
                keras.layers.Dense(1, activation=spec.activation),
            ]
        )
        model.set_weights(
            [w + rng.normal(0.0, 0.1, size=w.shape).astype(w.dtype) for w in model.get_weights()]
        )
    elif spec.layers == "norm-lstm-ln":
        # Synthetic readings of distinct offsets and scales per feature, for adapt().
        data = rng.normal(size=(256, 8, spec.features)) * np.arange(1, spec.features + 1) + 3.0
        norm = keras.layers.Normalization(axis=-1)
        norm.adapt(data.astype(np.float32))
        model = keras.Sequential(
            [
                keras.Input(shape=(None, spec.features)),
                norm,
                keras.layers.LSTM(spec.units, return_sequences=True),
                keras.layers.LayerNormalization(),
                keras.layers.TimeDistributed(keras.layers.Dense(1, activation=spec.activation)),
            ]
        )
        lstm = model.layers[1]
        lstm.set_weights([w + rng.normal(0.0, 0.1, size=w.shape).astype(w.dtype) for w in lstm.get_weights()])
    else:
        raise ValueError(f"bench model {spec.name!r}: unknown layers {spec.layers!r}")
    path = work_dir() / f"{spec.name}.keras"
    model.save(path)
    return path


@cache
def work_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="lstmd-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
