"""The refusals: what makes a loaded model unservable one event at a time.

Each check raises `UnservableModelError` (exit code 2) with a message naming the
layer and why it cannot run one step at a time, so an operator learns before any
connection what to change in the model. These checks read the model's structure
only; what the structure cannot show (a layer mixing time steps) is caught by
the self-check (selfcheck.py).
"""

from __future__ import annotations

import math
from typing import Any

import keras

from daemon.errors import UnservableModelError
from daemon.inference.layer_calls import causal_padding


def check_input(model: keras.Model, where: str) -> int:
    """The feature count of the model's one input, which must be (batch, time, features):
    an event is one time step of one sequence."""
    try:
        inputs = model.inputs
    except Exception as exc:
        raise UnservableModelError(
            f"{where}: the model has no defined input (build it, e.g. with keras.Input, before saving): {exc}"
        ) from exc
    if not inputs:
        raise UnservableModelError(f"{where}: the model has no defined input")
    if len(inputs) != 1:
        raise UnservableModelError(
            f"{where}: the model has {len(inputs)} inputs; lstmd serves models with "
            "exactly one input of shape (batch, time, features)"
        )
    shape = tuple(inputs[0].shape)
    if len(shape) != 3:
        raise UnservableModelError(
            f"{where}: the input has shape {shape} (rank {len(shape)}); lstmd needs "
            "rank 3: (batch, time, features)"
        )
    if shape[2] is None or int(shape[2]) < 1:
        raise UnservableModelError(
            f"{where}: the input has shape {shape}; the feature count (last axis) must be known"
        )
    return int(shape[2])


def check_layers(layers: list[keras.layers.Layer], where: str) -> list[keras.layers.RNN]:
    """The recurrent layers, after refusing every layer that needs the future of the
    sequence or hides a recurrent layer, and a model with no state to carry at all."""
    rnns: list[keras.layers.RNN] = []
    buffered = False
    for layer in layers:
        if isinstance(layer, keras.layers.Bidirectional):
            raise UnservableModelError(
                f"{where}: layer {layer.name!r} is Bidirectional; its backward pass "
                "needs the future of the sequence and cannot run one event at a time"
            )
        inner = getattr(layer, "layer", None)
        if isinstance(inner, keras.layers.RNN) and not isinstance(layer, keras.layers.RNN):
            raise UnservableModelError(
                f"{where}: recurrent layer {inner.name!r} is wrapped in "
                f"{type(layer).__name__} {layer.name!r}; lstmd only serves unwrapped "
                "recurrent layers"
            )
        if isinstance(layer, keras.layers.Conv1D):
            check_conv1d(layer, where)
            if layer.padding == "causal" and causal_padding(layer) > 0:
                buffered = True
        if isinstance(layer, keras.layers.RNN):
            if layer.go_backwards:
                raise UnservableModelError(
                    f"{where}: recurrent layer {layer.name!r} has go_backwards=True; "
                    "it reads the sequence from its end and cannot run one event at a time"
                )
            rnns.append(layer)
    if not rnns and not buffered:
        kinds = ", ".join(sorted({type(layer).__name__ for layer in layers})) or "none"
        raise UnservableModelError(
            f"{where}: the model has no recurrent layer (LSTM, GRU, SimpleRNN) nor causal "
            f"Conv1D; its layers are: {kinds}; there is no state to carry between events"
        )
    return rnns


def check_conv1d(layer: Any, where: str) -> None:
    """A Conv1D is served one event at a time when its output at a step reads that
    step and earlier inputs only: padding="causal" (or a kernel of one step),
    strides 1, channels last. Its past inputs are then kept as state."""
    what = f"layer {layer.name!r} (Conv1D)"
    if int(layer.strides[0]) != 1:
        raise UnservableModelError(
            f"{where}: {what} has strides={layer.strides[0]}: it outputs one step per "
            f"{layer.strides[0]} inputs, not one per event; lstmd serves a Conv1D with strides 1 only"
        )
    if layer.data_format != "channels_last":
        raise UnservableModelError(
            f"{where}: {what} has data_format={layer.data_format!r}: its axis 1 is not time; "
            "lstmd serves a Conv1D with data_format='channels_last' only"
        )
    reach = (int(layer.kernel_size[0]) - 1) * int(layer.dilation_rate[0])
    if layer.padding == "causal" or reach == 0:
        return
    why = {
        "same": "centres its kernel, so its output at a step reads later inputs (the future of the sequence)",
        "valid": f"shortens the sequence by {reach} steps, so its output at a step "
        "is that of a window ending later and the first events have no output",
    }.get(str(layer.padding), "does not pad causally")
    raise UnservableModelError(
        f"{where}: {what} has padding={layer.padding!r}: it {why}; it is not causal and "
        "cannot run one event at a time; lstmd serves Conv1D with padding='causal' "
        "(its last (kernel_size - 1) * dilation_rate inputs kept as state)"
    )


def output_layout(model: keras.Model, where: str) -> tuple[tuple[bool, ...], int]:
    """For each output (tree.flatten order): has a time axis?; and the total width."""
    try:
        outs = list(model.outputs)  # keras.tree.flatten order of the output structure
    except Exception as exc:
        raise UnservableModelError(f"{where}: the model has no defined output: {exc}") from exc
    if not outs:
        raise UnservableModelError(f"{where}: the model has no output")
    has_time: list[bool] = []
    width = 0
    for out in outs:
        shape = tuple(out.shape)
        timed = len(shape) >= 3 and shape[1] is None
        per_step = shape[2:] if timed else shape[1:]
        if any(d is None for d in per_step):
            raise UnservableModelError(
                f"{where}: an output has shape {shape}; the size of one step of each output must be known"
            )
        has_time.append(timed)
        width += math.prod(int(d) for d in per_step)
    if width < 1:
        raise UnservableModelError(f"{where}: the model's outputs are empty")
    return tuple(has_time), width
