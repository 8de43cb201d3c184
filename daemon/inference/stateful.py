"""The copies of a model that lstmd serves: the batch-1 stateful copy, and a stateless reference.

Keras steps a sequence one event at a time only in a stateful layer of a fixed
batch size: the model (trained stateless, any batch, whole sequences) is rebuilt
from its config with `stateful=True` and a (1, 1, features) input, its weights
copied in (`stateful_copy`). A model saved stateful or with a fixed batch or time
size gets a stateless copy too (`stateless_reference`): the reference the self-check
and the engines compare against takes any prefix.
"""

from __future__ import annotations

import copy
from typing import Any

import keras

from daemon.errors import UnservableModelError
from daemon.inference.layer_calls import (
    buffer_causal_conv,
    carry_masked_output,
    causal_padding,
    conv_buffer,
    layer_states,
)
from daemon.inference.servable import walk_layers


def stateful_copy(model: keras.Model, where: str, n_features: int) -> keras.Model:
    """The batch-1 stateful copy: input batch_shape (1, 1, n_features), every recurrent
    layer stateful, the layer calls that need it patched (layer_calls.py)."""
    return _copy(model, where, stateful=True, batch_shape=(1, 1, n_features))


def stateless_reference(
    model: keras.Model, rnns: list[keras.layers.RNN], where: str, n_features: int
) -> keras.Model:
    """The model as the stateless reference (any batch of any length, no state carried
    between calls): the loaded model itself, or, when it was trained with a fixed batch
    or time size or saved stateful, a copy that takes any prefix."""
    shape = tuple(model.inputs[0].shape)
    if shape[0] is None and shape[1] is None and not any(r.stateful for r in rnns):
        return model
    return _copy(model, where, stateful=False, batch_shape=(None, None, n_features))


def state_layout(stateful: keras.Model, where: str) -> tuple[list[Any], list[tuple[int, ...]], list[Any]]:
    """The stateful copy's layers that hold a sequence's state (the recurrent layers and
    the buffered causal Conv1D layers, in model order), the shape of each of their state
    variables without the batch dimension, and those variables (see `ServableModel`)."""
    stateful_layers = [
        layer
        for layer in walk_layers(stateful)
        if isinstance(layer, keras.layers.RNN) or conv_buffer(layer) is not None
    ]
    state_shapes: list[tuple[int, ...]] = []
    state_variables: list[Any] = []
    for layer in stateful_layers:
        states = layer_states(layer)
        if not states:
            raise UnservableModelError(
                f"{where}: recurrent layer {layer.name!r} has no state variables in its stateful copy"
            )
        for var in states:
            shape = tuple(var.shape)
            if len(shape) < 2 or shape[0] != 1 or any(d is None for d in shape):
                raise UnservableModelError(
                    f"{where}: layer {layer.name!r} has a state of shape "
                    f"{shape} in its stateful copy, expected (1, ...)"
                )
            state_shapes.append(tuple(int(d) for d in shape[1:]))
            state_variables.append(var)
    return stateful_layers, state_shapes, state_variables


def _copy(
    model: keras.Model,
    where: str,
    *,
    stateful: bool,
    batch_shape: tuple[int | None, int | None, int],
) -> keras.Model:
    """A copy of the model's architecture and weights, with every recurrent layer's
    `stateful` set as given and the input's batch_shape replaced."""
    kind = "batch-1 stateful" if stateful else "stateless"
    try:
        config = copy.deepcopy(model.get_config())
        _rewrite_config(config, top=True, stateful=stateful, batch_shape=batch_shape)
        clone = type(model).from_config(config)
    except Exception as exc:
        raise UnservableModelError(
            f"{where}: cannot build a {kind} copy of the model from its config: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(clone, keras.Model):
        raise UnservableModelError(f"{where}: the {kind} copy is not a model")
    try:
        clone.set_weights(model.get_weights())
    except Exception as exc:
        raise UnservableModelError(
            f"{where}: cannot copy the weights into the {kind} copy: {type(exc).__name__}: {exc}"
        ) from exc
    _finalize_states(clone, where, kind)
    if stateful:
        for layer in walk_layers(clone):
            if isinstance(layer, keras.layers.RNN):
                carry_masked_output(layer)
            elif (
                isinstance(layer, keras.layers.Conv1D)
                and layer.padding == "causal"
                and causal_padding(layer) > 0
            ):
                buffer_causal_conv(layer)
    return clone


def _finalize_states(model: keras.Model, where: str, kind: str) -> None:
    """Recompute what layers derive from their non-trainable variables.

    `set_weights` assigns the variables only. An adapted `Normalization` computes
    the `mean` and `variance` tensors its call uses from its `adapt_mean` and
    `adapt_variance` variables in `finalize_state()`, which Keras calls after
    `adapt()` and after loading a file but not after `set_weights`: without this
    the copy would normalize with the initial zeros and ones. Every preprocessing
    layer with such derived state (Normalization, Discretization, the lookups)
    has the same hook.
    """
    for layer in walk_layers(model):
        finalize = getattr(layer, "finalize_state", None)
        if callable(finalize):
            try:
                finalize()
            except Exception as exc:
                raise UnservableModelError(
                    f"{where}: cannot finalize layer {layer.name!r} of the {kind} copy: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc


def _rewrite_config(
    config: dict[str, Any],
    *,
    top: bool,
    stateful: bool,
    batch_shape: tuple[int | None, int | None, int],
) -> None:
    """Edit a model config in place: `stateful` on every recurrent layer, the batch
    dimension of every input (the whole batch_shape for the top model's input)."""
    batch = batch_shape[0]
    if "build_input_shape" in config and top:
        config["build_input_shape"] = list(batch_shape)
    for entry in config.get("layers", []):
        if not isinstance(entry, dict):
            continue
        # Layers are rebuilt when called on the new inputs; a stale build shape
        # (with the old batch size) would make a stateful layer build wrongly.
        entry.pop("build_config", None)
        layer_cfg = entry.get("config")
        if not isinstance(layer_cfg, dict):
            continue
        if entry.get("class_name") == "InputLayer":
            old = layer_cfg.get("batch_shape") or layer_cfg.get("batch_input_shape")
            if top:
                new = list(batch_shape)
            elif isinstance(old, list | tuple) and old:
                new = [batch, *old[1:]]
            else:
                continue
            layer_cfg.pop("batch_input_shape", None)
            layer_cfg.pop("shape", None)
            layer_cfg["batch_shape"] = new
        elif "layers" in layer_cfg:  # a nested model
            _rewrite_config(layer_cfg, top=False, stateful=stateful, batch_shape=batch_shape)
            if "build_input_shape" in layer_cfg and isinstance(layer_cfg["build_input_shape"], list):
                old = layer_cfg["build_input_shape"]
                if old:
                    layer_cfg["build_input_shape"] = [batch, *old[1:]]
        elif "stateful" in layer_cfg and "go_backwards" in layer_cfg:
            layer_cfg["stateful"] = stateful
