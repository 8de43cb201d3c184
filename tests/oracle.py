"""THE correctness oracle of the test suite.

Every engine, every state-handling path and every end-to-end test checks its
outputs against `expected_outputs`, and against nothing else.

Definition. For a model file and a sequence x of shape (T, F), the expected output
at step t is what the model as trained, stateless, computes for the prefix
x[: t + 1] on its own:

* the model is loaded from the file with `keras.saving.load_model` (never through
  daemon.inference.model), and called once per prefix: `model(prefix[None], training=False)`;
* recurrent layers saved stateful are reset before every call, so nothing is
  carried from one call to the next;
* each output that is 3-D (batch, time, units) contributes its last time step,
  any other output its only row; each is flattened;
* the outputs are concatenated in `keras.tree.flatten` order (list order; dict
  outputs by sorted key).

Keras 2 HDF5 files (tests/support/keras2_models.py) are checked against the same
definition evaluated by Keras 2 itself (tf_keras, in a subprocess): its
`expected_outputs`. Loading them here would go through the very translation
under test.

This is deliberately the slow, obviously-correct way (T calls for T steps, no
padding, no masking): the test models are tiny. Its only assumption beyond Keras
is that a 3-D output has its time axis at 1, which holds for every model in
tests/support/models.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

FileVersion = tuple[str, int, int]


def _version(model_path: str | Path) -> FileVersion:
    path = Path(model_path).resolve()
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


@cache
def _load(path: str, mtime_ns: int, size: int) -> keras.Model:
    return keras.saving.load_model(path, compile=False)


def load_reference(model_path: str | Path) -> keras.Model:
    """The stateless model as saved, loaded with Keras alone (cached per file version)."""
    return _load(*_version(model_path))


#: The oracle's answers for a model file's version and the inputs' bytes: tests
#: of several engines (or one engine several ways) ask the same question again.
_answers: dict[tuple[str, FileVersion, tuple[tuple[tuple[int, ...], bytes], ...]], list[np.ndarray]] = {}


def _remembered(
    how: str, model_path: str | Path, xs: list[np.ndarray], compute: Callable[[], list[np.ndarray]]
) -> list[np.ndarray]:
    """compute(), or the arrays it gave for the same file version and inputs (copies)."""
    key = (how, _version(model_path), tuple((x.shape, x.tobytes()) for x in xs))
    if key not in _answers:
        _answers[key] = compute()
    return [a.copy() for a in _answers[key]]


def _recurrent_layers(model: keras.Model) -> list[keras.layers.RNN]:
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.RNN):
            found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_recurrent_layers(layer))
    return found


def expected_outputs(model_path_or_keras_model: str | Path | keras.Model, sequence: np.ndarray) -> np.ndarray:
    """(T, output_width) float64: row t is the model's output for x[: t + 1] alone
    (for a model file, remembered per file version and input)."""
    x = np.asarray(sequence, dtype=np.float32)
    assert x.ndim == 2, f"a sequence is (T, F), got shape {x.shape}"
    if isinstance(model_path_or_keras_model, keras.Model):
        return _expected_outputs(model_path_or_keras_model, x)
    path = model_path_or_keras_model
    (y,) = _remembered("one", path, [x], lambda: [_expected_outputs(load_reference(path), x)])
    return y


def _expected_outputs(model: keras.Model, x: np.ndarray) -> np.ndarray:
    stateful = [layer for layer in _recurrent_layers(model) if layer.stateful]
    rows = []
    for t in range(x.shape[0]):
        for layer in stateful:
            layer.reset_state()
        outputs = model(x[None, : t + 1], training=False)
        parts = []
        for out in keras.tree.flatten(outputs):
            arr = np.asarray(out, dtype=np.float64)
            assert arr.shape[0] == 1
            row = arr[0, -1] if arr.ndim == 3 else arr[0]
            parts.append(row.reshape(-1))
        rows.append(np.concatenate(parts))
    for layer in stateful:
        layer.reset_state()
    return np.stack(rows) if rows else np.zeros((0, 0))


def expected_outputs_many(
    model_path_or_keras_model: str | Path | keras.Model, sequences: list[np.ndarray]
) -> list[np.ndarray]:
    """`expected_outputs` of several sequences, computed in fewer model calls.

    The same definition, evaluated faster: all prefixes of one length t, taken
    from every sequence at least t long, are stacked into one batch. They have
    equal length, so nothing is padded or masked; each row of a stateless model's
    batch depends on its own input only. Models saved stateful (a fixed batch
    size) go through `expected_outputs` one sequence at a time. For a model file,
    the answers are remembered per file version and inputs.
    """
    xs = [np.asarray(s, dtype=np.float32) for s in sequences]
    if isinstance(model_path_or_keras_model, keras.Model):
        return _expected_outputs_many(model_path_or_keras_model, xs)
    path = model_path_or_keras_model
    return _remembered("many", path, xs, lambda: _expected_outputs_many(load_reference(path), xs))


def _expected_outputs_many(model: keras.Model, xs: list[np.ndarray]) -> list[np.ndarray]:
    if any(layer.stateful for layer in _recurrent_layers(model)):
        return [expected_outputs(model, x) for x in xs]
    rows: list[list[np.ndarray]] = [[] for _ in xs]
    for t in range(1, max((len(x) for x in xs), default=0) + 1):
        members = [i for i, x in enumerate(xs) if len(x) >= t]
        outputs = model(np.stack([xs[i][:t] for i in members]), training=False)
        parts = []
        for out in keras.tree.flatten(outputs):
            arr = np.asarray(out, dtype=np.float64)
            last = arr[:, -1] if arr.ndim == 3 else arr
            parts.append(last.reshape(len(members), -1))
        batch = np.concatenate(parts, axis=1)
        for row, i in enumerate(members):
            rows[i].append(batch[row])
    return [np.stack(r) if r else np.zeros((0, 0)) for r in rows]


def assert_matches(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-5) -> None:
    """Element-wise |actual - expected| <= atol, same shapes; a readable failure."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    err = np.abs(actual - expected)
    bad = ~(err <= atol)  # NaN counts as bad
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.size} values differ by more than {atol:g}; "
            f"max error {np.nanmax(err):.3g}; first at {idx}: "
            f"actual {actual[idx]!r} expected {expected[idx]!r}"
        )
