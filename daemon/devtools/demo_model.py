"""The demo model and the synthetic sensor data it is trained on and served with.

The demo is a room-temperature forecaster. Each sequence is one room's temperature
sensor, read every 15 minutes (96 readings a day). A reading is built from:

* the room's own level (19 to 23 °C),
* a daily cycle (fundamental plus a second harmonic, 1 to 3 °C amplitude, the
  room's own phase),
* a slow mean-reverting drift (weather, occupancy),
* short-lived correlated disturbances (doors, heating cycling: AR(1), 0.8 per step),
* sensor noise, and the sensor's 0.01 °C resolution.

The model sees each reading scaled by the fixed scale below (`to_features`: 15 °C
-> 0, 30 °C -> 1) and predicts, at every step, the NEXT reading (15 minutes later),
scaled the same way (`from_output` turns it back into °C). Its architecture is the
classic Keras stateful example's: Input(1 feature) -> LSTM(32) -> Dense(1, sigmoid).
It is trained stateless (return_sequences=False) on windows -> the reading that
follows: 48-step windows (12 hours), plus 8- and 288-step ones so that it also
does well on the first readings of a sequence and on the long histories of
streaming. lstmd serves it statefully, one reading at a time. Its first few
readings of a sequence are a warm-up: predictions are poor until it has seen
about 20 readings (5 hours).

`make_demo_model` is deterministic for a given seed (same data, same
initialisation, same shuffling).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

#: Fixed scale: features and outputs are (celsius - TEMP_LOW_C) / TEMP_SPAN_C, so the
#: usual indoor range 15-30 °C maps to [0, 1].
TEMP_LOW_C = 15.0
TEMP_HIGH_C = 30.0
TEMP_SPAN_C = TEMP_HIGH_C - TEMP_LOW_C
#: Readings per day (one every 15 minutes).
STEPS_PER_DAY = 96
#: LSTM size.
UNITS = 32
#: Training windows: (length, stride). 48 steps (12 hours) is the main window; the
#: short and the long ones teach the model the first readings of a sequence and
#: histories longer than 12 hours, which lstmd's streaming serving sees all the
#: time (trained on 48-step windows only, its streaming MSE after the first 48 steps
#: was 1.4-1.6 times the naive forecast's in a trial, instead of 0.36 times).
WINDOWS = ((8, 2), (48, 3), (288, 16))
#: Readings fed before the streaming metrics count (a sequence's warm-up).
WARM_UP = 48

_TRAIN_SERIES = 24
_VAL_SERIES = 6
_SERIES_LENGTH = 1200
_EPOCHS = 10
_BATCH = 64
_LEARNING_RATE = 3e-3


def to_features(celsius: np.ndarray | float) -> np.ndarray:
    """Readings in °C -> the model's input: float32 (T, 1) scaled by the fixed scale."""
    c = np.asarray(celsius, dtype=np.float64).reshape(-1, 1)
    return ((c - TEMP_LOW_C) / TEMP_SPAN_C).astype(np.float32)


def from_output(y: np.ndarray | float) -> np.ndarray:
    """The model's output (scaled next reading) -> °C."""
    return np.asarray(y, dtype=np.float64) * TEMP_SPAN_C + TEMP_LOW_C


def demo_series(seq_id: str, n: int, seed: int = 7) -> np.ndarray:
    """`n` readings (°C, float64, 0.01 °C resolution) of the sensor `seq_id`.

    Deterministic in (seq_id, n, seed); the first n readings do not depend on n.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    key = [seed, zlib.crc32(seq_id.encode("utf-8"))]
    rng = np.random.default_rng(key)
    level = rng.uniform(19.0, 23.0)
    amp = rng.uniform(1.0, 3.0)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    start = int(rng.integers(0, STEPS_PER_DAY))
    drift_sd, ar_sd, noise_sd = 0.01, 0.03, 0.02
    # Independent streams so that the first n readings do not depend on n.
    drift_rng, ar_rng, noise_rng = (np.random.default_rng([*key, k]) for k in (1, 2, 3))
    out = np.empty(n, dtype=np.float64)
    drift = float(rng.normal(0.0, 0.5))
    ar = 0.0
    for i in range(n):
        angle = 2.0 * np.pi * (start + i) / STEPS_PER_DAY + phase
        daily = amp * (np.sin(angle) + 0.3 * np.sin(2.0 * angle + phase))
        drift = 0.995 * drift + drift_rng.normal(0.0, drift_sd)
        ar = 0.8 * ar + ar_rng.normal(0.0, ar_sd)
        out[i] = level + daily + drift + ar + noise_rng.normal(0.0, noise_sd)
    return np.round(out, 2)


@dataclass(frozen=True)
class DemoTrainingReport:
    """Validation mean squared errors (scaled units) on held-out sensors, of the
    model and of the naive "same as the last reading" forecast.

    `window_*`: predicting the reading after each 48-step window.
    `stream_*`: streaming as lstmd serves it, every reading of 1200-reading series
    predicted from all readings before it, counted after the first WARM_UP ones.
    """

    window_mse: float
    window_naive_mse: float
    stream_mse: float
    stream_naive_mse: float


def _windows(series: list[np.ndarray], length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for s in series:
        f = to_features(s)[:, 0]
        for start in range(0, len(f) - length, stride):
            xs.append(f[start : start + length])
            ys.append(f[start + length])
    return np.stack(xs)[..., None].astype(np.float32), np.asarray(ys, np.float32)[:, None]


def make_demo_model(path: Path, seed: int = 7) -> Path:
    """Train the demo model with `seed` and save it to `path` (a .keras file).

    About 30 s on 2 cores. The same seed gives the same weights (the .keras file's
    bytes differ by its save timestamp).
    """
    train_demo_model(path, seed)
    return Path(path)


def train_demo_model(path: Path, seed: int = 7) -> DemoTrainingReport:
    """`make_demo_model`, returning the validation report."""
    import keras

    keras.utils.set_random_seed(seed)
    train = [demo_series(f"train-{i}", _SERIES_LENGTH, seed) for i in range(_TRAIN_SERIES)]
    val = [demo_series(f"val-{i}", _SERIES_LENGTH, seed) for i in range(_VAL_SERIES)]
    data = [_windows(train, length, stride) for length, stride in WINDOWS]

    def architecture(return_sequences: bool) -> keras.Model:
        return keras.Sequential(
            [
                keras.Input(shape=(None, 1)),
                keras.layers.LSTM(UNITS, return_sequences=return_sequences),
                keras.layers.Dense(1, activation="sigmoid"),
            ],
            name="room_temperature_next",
        )

    model = architecture(return_sequences=False)
    total_batches = _EPOCHS * sum(-(-len(x) // _BATCH) for x, _ in data)
    schedule = keras.optimizers.schedules.CosineDecay(_LEARNING_RATE, total_batches, alpha=0.03)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    for _ in range(_EPOCHS):
        for x, y in data:  # one window length per fit: a batch needs equal lengths
            model.fit(x, y, batch_size=_BATCH, epochs=1, shuffle=True, verbose=0)

    xv, yv = _windows(val, 48, 3)
    window_mse = float(np.mean((model.predict(xv, batch_size=512, verbose=0) - yv) ** 2))
    window_naive = float(np.mean((xv[:, -1, :] - yv) ** 2))
    # The same weights with return_sequences=True give, at every step, the
    # prediction from the whole history so far: what lstmd serves.
    streaming = architecture(return_sequences=True)
    streaming.set_weights(model.get_weights())
    fv = np.stack([to_features(s) for s in val])
    pred = streaming.predict(fv, verbose=0)[:, WARM_UP:-1, 0]
    target = fv[:, WARM_UP + 1 :, 0]
    stream_mse = float(np.mean((pred - target) ** 2))
    stream_naive = float(np.mean((fv[:, WARM_UP:-1, 0] - target) ** 2))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return DemoTrainingReport(window_mse, window_naive, stream_mse, stream_naive)
