"""What a loaded model is once it can be served: `ServableModel`, and its stateless reference.

The output of one step ("y") is the concatenation, over the model's outputs in
`keras.tree.flatten` order, of each output at the last time step, flattened: both
the stateful copy's one-step output and the stateless model's whole-prefix output
are read that one way (`flatten_last_step`), so the self-check and the engines'
parity checks compare like with like.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from daemon.inference.formats import KERAS


@dataclass(frozen=True)
class ModelIdentity:
    """Which model file is served: its stem and the SHA-256 of its bytes."""

    name: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"


@dataclass(eq=False)
class ServableModel:
    """A loaded model ready to be stepped one event at a time.

    `stateless` is the model as trained (batch and time dimensions free);
    `stateful` is its batch-1 stateful copy with input batch_shape (1, 1, n_features),
    sharing the same weights values. `stateful_layers` are the layers of the copy
    that hold a sequence's state, in model order: the recurrent layers and the
    causal Conv1D layers (kernel reaching past steps); `state_shapes` lists, layer
    after layer, the shape of each of their state variables without the batch
    dimension (LSTM(8) gives (8,), (8,); GRU(4) gives (4,); a causal Conv1D of
    kernel_size 3 and dilation_rate 2 over 5 channels gives (20,): its last 4
    inputs, oldest first, see `conv_buffer`). `state_variables` are those
    variables, in the same order (an RNN of stacked cells has its states nested:
    they are flattened here, in `keras.tree.flatten` order). `output_has_time` says, for each model output
    in `keras.tree.flatten` order, whether it has a time axis (axis 1) of which
    the last step is taken.
    """

    identity: ModelIdentity
    n_features: int
    output_width: int
    stateless: keras.Model
    stateful: keras.Model
    stateful_layers: list[keras.layers.Layer]
    state_shapes: list[tuple[int, ...]]
    layer_kinds: list[str]
    output_has_time: tuple[bool, ...] = field(default=())
    state_variables: list[Any] = field(default_factory=list)
    file_format: str = KERAS
    translations: tuple[str, ...] = field(default=())
    """The file's format (daemon.inference.formats) and the Keras 2 config keys
    rewritten to read it."""

    def reset_states(self) -> None:
        """Zero the state variables of the stateful copy (recurrent states, causal
        Conv1D buffers: zeros are the causal padding)."""
        # Not layer.reset_state(): it does not handle the nested states of stacked cells.
        for var in self.state_variables:
            var.assign(np.zeros(tuple(var.shape), dtype=var.dtype))

    def flatten_step_outputs(self, outputs: Any) -> np.ndarray:
        """The (output_width,) float32 y of one step of the batch-1 stateful copy.

        `outputs` is what `stateful.predict_on_batch` (or a call) returned for an
        input of shape (1, 1, n_features).
        """
        return flatten_last_step(outputs, self.output_has_time)


def last_step_output(model: ServableModel, prefix: np.ndarray) -> np.ndarray:
    """The stateless model's y at the last time step of a (T, F) prefix.

    One call of the stateless model on the whole prefix (batch of one, inference
    mode); outputs with a time axis contribute their last step; every output is
    flattened and the outputs are concatenated in `keras.tree.flatten` order.
    Returns a float32 array of shape (output_width,).
    """
    x = np.asarray(prefix, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != model.n_features:
        raise ValueError(f"prefix must have shape (T>=1, {model.n_features}), got {x.shape}")
    outputs = model.stateless(x[None], training=False)
    return flatten_last_step(outputs, model.output_has_time)


def flatten_last_step(outputs: Any, has_time: tuple[bool, ...]) -> np.ndarray:
    flat = keras.tree.flatten(outputs)
    if len(flat) != len(has_time):
        raise ValueError(f"expected {len(has_time)} outputs, got {len(flat)}")
    parts = []
    for out, timed in zip(flat, has_time, strict=True):
        arr = np.asarray(out)
        parts.append((arr[0, -1] if timed else arr[0]).reshape(-1))
    return np.concatenate(parts).astype(np.float32, copy=False)


def walk_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of the model in order, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from walk_layers(layer)
