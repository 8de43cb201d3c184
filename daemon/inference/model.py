"""Loading a Keras model file and turning it into something servable one event at a time.

A model is trained stateless, on whole sequences of any batch size. lstmd serves it
statefully: each input record is one time step of one sequence, and the recurrent
state of every sequence is carried between records. `load_model` therefore builds,
next to the loaded (stateless) model, a batch-1 stateful copy of the same
architecture and weights whose input is exactly one step of one sequence, and it
checks at start-up that feeding a sequence step by step through the copy gives the
same outputs as the stateless model applied to every prefix. Models for which that
cannot hold are refused with `UnservableModelError` (exit code 2).

This module is the entry point; each step is a module of its own, imported in this
order (the inference layers contract in pyproject.toml): formats.py reads the file,
checks.py refuses what cannot be served, stateful.py builds the copies (patching the
layer calls of layer_calls.py), selfcheck.py runs the start-up self-check, and
servable.py is what comes out. The names callers use are re-exported here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras

from daemon.errors import UnservableModelError
from daemon.inference.checks import check_input, check_layers, output_layout
from daemon.inference.formats import read_model, refuse_unreadable_path
from daemon.inference.selfcheck import SELF_CHECK_STEPS, mask_value, verify
from daemon.inference.servable import ModelIdentity, ServableModel, last_step_output, walk_layers
from daemon.inference.stateful import state_layout, stateful_copy, stateless_reference

__all__ = [
    "SELF_CHECK_STEPS",
    "ModelIdentity",
    "ServableModel",
    "last_step_output",
    "load_model",
    "mask_value",
    "verify",
]


def load_model(path: str | Path) -> ServableModel:
    """Load a model file and make it servable, or raise UnservableModelError.

    Formats: a Keras 3 `.keras` file, or a Keras 2 HDF5 `.h5`/`.hdf5` file (see
    daemon.inference.formats, which also refuses the others, saying how to convert).
    Refused: a file that is missing, unreadable or not a Keras model; no recurrent
    layer (LSTM, GRU, SimpleRNN or another keras.layers.RNN) nor causal Conv1D; a
    Conv1D that is not causal (padding "same" or "valid" with a kernel of more than
    one step), strided or channels-first (see `checks.check_conv1d`); a Bidirectional layer;
    a recurrent layer with go_backwards=True or wrapped in another layer; more than
    one input; an input not of shape (batch, time, features) with a known feature
    count; anything that prevents building the batch-1 stateful copy; and a model
    whose step-by-step outputs differ from its whole-prefix outputs (start-up
    self-check, see `selfcheck.verify`).
    """
    path = Path(path)
    where = f"model file {str(path)!r}"
    refuse_unreadable_path(path, where)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnservableModelError(f"{where}: cannot be read: {exc}") from exc
    identity = ModelIdentity(name=path.stem, sha256=hashlib.sha256(data).hexdigest())
    source = read_model(path, data, where)
    loaded = source.model
    if not isinstance(loaded, keras.Model):
        raise UnservableModelError(f"{where}: holds a {type(loaded).__name__}, not a model")

    n_features = check_input(loaded, where)
    layers = list(walk_layers(loaded))
    rnns = check_layers(layers, where)

    stateless = stateless_reference(loaded, rnns, where, n_features)
    output_has_time, output_width = output_layout(stateless, where)

    stateful = stateful_copy(loaded, where, n_features)
    stateful_layers, state_shapes, state_variables = state_layout(stateful, where)

    model = ServableModel(
        identity=identity,
        n_features=n_features,
        output_width=output_width,
        stateless=stateless,
        stateful=stateful,
        stateful_layers=stateful_layers,
        state_shapes=state_shapes,
        layer_kinds=[
            type(layer).__name__
            for layer in walk_layers(stateful)
            if not isinstance(layer, keras.layers.InputLayer)
        ],
        output_has_time=output_has_time,
        state_variables=state_variables,
        file_format=source.format,
        translations=source.translations,
    )
    verify(model, where=where)
    return model
