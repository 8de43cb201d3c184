"""Loading a Keras model file and turning it into something servable one event at a time.

A model is trained stateless, on whole sequences of any batch size. lstmd serves it
statefully: each input record is one time step of one sequence, and the recurrent
state of every sequence is carried between records. `load_model` therefore builds,
next to the loaded (stateless) model, a batch-1 stateful copy of the same
architecture and weights whose input is exactly one step of one sequence, and it
checks at start-up that feeding a sequence step by step through the copy gives the
same outputs as the stateless model applied to every prefix. Models for which that
cannot hold are refused with `UnservableModelError` (exit code 2).

The output of one step ("y") is the concatenation, over the model's outputs in
`keras.tree.flatten` order, of each output at the last time step, flattened.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from daemon.errors import UnservableModelError
from daemon.inference.formats import KERAS, read_model, refuse_unreadable_path
from daemon.inference.tolerance import ATOL, RTOL

#: Length of the random sequence of the start-up self-check.
SELF_CHECK_STEPS = 5


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
        return _flatten_last_step(outputs, self.output_has_time)


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
    return _flatten_last_step(outputs, model.output_has_time)


def load_model(path: str | Path) -> ServableModel:
    """Load a model file and make it servable, or raise UnservableModelError.

    Formats: a Keras 3 `.keras` file, or a Keras 2 HDF5 `.h5`/`.hdf5` file (see
    daemon.inference.formats, which also refuses the others, saying how to convert).
    Refused: a file that is missing, unreadable or not a Keras model; no recurrent
    layer (LSTM, GRU, SimpleRNN or another keras.layers.RNN) nor causal Conv1D; a
    Conv1D that is not causal (padding "same" or "valid" with a kernel of more than
    one step), strided or channels-first (see `_check_conv1d`); a Bidirectional layer;
    a recurrent layer with go_backwards=True or wrapped in another layer; more than
    one input; an input not of shape (batch, time, features) with a known feature
    count; anything that prevents building the batch-1 stateful copy; and a model
    whose step-by-step outputs differ from its whole-prefix outputs (start-up
    self-check, see `verify`).
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

    n_features = _check_input(loaded, where)
    layers = list(_walk_layers(loaded))
    rnns = _check_layers(layers, where)

    if _needs_stateless_rebuild(loaded, rnns):
        # Trained with a fixed batch or time size, or saved stateful: rebuild a copy
        # that takes any batch of any length and carries no state between calls.
        stateless = _rebuild(loaded, where, stateful=False, batch_shape=(None, None, n_features))
    else:
        stateless = loaded

    output_has_time, output_width = _output_layout(stateless, where)

    stateful = _rebuild(loaded, where, stateful=True, batch_shape=(1, 1, n_features))
    stateful_layers = [
        layer
        for layer in _walk_layers(stateful)
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
            for layer in _walk_layers(stateful)
            if not isinstance(layer, keras.layers.InputLayer)
        ],
        output_has_time=output_has_time,
        state_variables=state_variables,
        file_format=source.format,
        translations=source.translations,
    )
    verify(model, where=where)
    return model


#: The attribute of a causal Conv1D of the stateful copy holding its input buffer.
_BUFFER = "_lstmd_input_buffer"


def conv_buffer(layer: Any) -> Any:
    """The input buffer variable of a causal Conv1D of the stateful copy, or None:
    its last (kernel_size - 1) * dilation_rate inputs, oldest first, flattened
    to shape (1, that * input channels) like the vector states of the recurrent
    layers (see `_buffer_causal_conv`)."""
    return getattr(layer, _BUFFER, None)


def layer_states(layer: Any) -> list[Any]:
    """The state variables of a layer of `ServableModel.stateful_layers`, in the
    order of `state_variables`: a recurrent layer's states (flattened), or a
    causal Conv1D's input buffer."""
    buffer = conv_buffer(layer)
    if buffer is not None:
        return [buffer]
    return list(keras.tree.flatten(layer.states)) if layer.states is not None else []


def causal_padding(layer: Any) -> int:
    """How many past inputs a causal Conv1D reads: (kernel_size - 1) * dilation_rate."""
    return (int(layer.kernel_size[0]) - 1) * int(layer.dilation_rate[0])


def mask_value(model: ServableModel) -> np.float32 | None:
    """The mask_value of the model's first `Masking` layer, or None without one.

    Checks that feed random inputs (the self-check, the engines' parity guard)
    use it to take the masked-step path too."""
    for layer in _walk_layers(model.stateless):
        if isinstance(layer, keras.layers.Masking):
            return np.float32(layer.mask_value)
    return None


def verify(
    model: ServableModel,
    *,
    steps: int = SELF_CHECK_STEPS,
    seed: int = 0,
    where: str | None = None,
) -> None:
    """Start-up self-check: stepping the stateful copy equals the stateless model.

    Feeds a seeded random (steps, F) sequence one step at a time through the
    stateful copy, from a zero state, and compares each step's y with
    `last_step_output` of the prefix so far. A difference above the tolerance
    means the model is not causal step by step (a layer mixes time steps outside
    the recurrent states and causal Conv1D buffers, e.g. a pooling over time):
    UnservableModelError.
    The states are zero again afterwards. This also traces the stateful copy's
    predict function once, so the first real event does not pay for it.
    """
    where = where or f"model {model.identity}"
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, model.n_features)).astype(np.float32)
    # A model that masks steps is also checked on masked steps (a run of two),
    # the path random inputs never take.
    masked = mask_value(model)
    if masked is not None and steps >= 4:
        xs[1:3] = masked
    model.reset_states()
    try:
        for t in range(steps):
            try:
                raw = model.stateful.predict_on_batch(xs[t].reshape(1, 1, model.n_features))
                got = model.flatten_step_outputs(raw)
                want = last_step_output(model, xs[: t + 1])
            except UnservableModelError:
                raise
            except Exception as exc:
                raise UnservableModelError(
                    f"{where}: cannot run the model one step at a time: {type(exc).__name__}: {exc}"
                ) from exc
            if got.shape != (model.output_width,) or want.shape != (model.output_width,):
                raise UnservableModelError(
                    f"{where}: the outputs of one step have {got.size} values and those "
                    f"of the whole prefix {want.size}, expected {model.output_width}"
                )
            if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
                err = float(np.max(np.abs(got.astype(np.float64) - want)))
                raise UnservableModelError(
                    f"{where}: the model is not causal step by step: fed one time step "
                    f"at a time with its recurrent state carried, its output at step {t} "
                    f"differs from the output of the whole {t + 1}-step prefix by {err:.3g} "
                    f"(tolerance {ATOL:g}); some layer mixes time steps outside "
                    "the recurrent state (e.g. a pooling or an attention over time)"
                )
    finally:
        model.reset_states()


# --------------------------------------------------------------------------- helpers


def _flatten_last_step(outputs: Any, has_time: tuple[bool, ...]) -> np.ndarray:
    flat = keras.tree.flatten(outputs)
    if len(flat) != len(has_time):
        raise ValueError(f"expected {len(has_time)} outputs, got {len(flat)}")
    parts = []
    for out, timed in zip(flat, has_time, strict=True):
        arr = np.asarray(out)
        parts.append((arr[0, -1] if timed else arr[0]).reshape(-1))
    return np.concatenate(parts).astype(np.float32, copy=False)


def _walk_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of the model in order, descending into nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)


def _check_input(model: keras.Model, where: str) -> int:
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


def _check_layers(layers: list[keras.layers.Layer], where: str) -> list[keras.layers.RNN]:
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
            _check_conv1d(layer, where)
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


def _check_conv1d(layer: Any, where: str) -> None:
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


def _needs_stateless_rebuild(model: keras.Model, rnns: list[keras.layers.RNN]) -> bool:
    shape = tuple(model.inputs[0].shape)
    return shape[0] is not None or shape[1] is not None or any(r.stateful for r in rnns)


def _output_layout(model: keras.Model, where: str) -> tuple[tuple[bool, ...], int]:
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


def _rebuild(
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
        for layer in _walk_layers(clone):
            if isinstance(layer, keras.layers.RNN):
                _carry_masked_output(layer)
            elif (
                isinstance(layer, keras.layers.Conv1D)
                and layer.padding == "causal"
                and causal_padding(layer) > 0
            ):
                _buffer_causal_conv(layer)
    return clone


def _buffer_causal_conv(layer: Any) -> None:
    """Make a causal Conv1D of the batch-1 copy compute one step from a buffer.

    Called on a whole sequence, a causal Conv1D pads it with (kernel_size - 1) *
    dilation_rate zero steps in front and applies its kernel to the window that
    ends at each step. Called on one step, it would see that step alone after
    the zeros. The copy's layer therefore keeps its last inputs in a variable,
    as a stateful RNN keeps its states: its call concatenates that buffer with
    the step, applies the kernel to the window ("valid": one output step), and
    keeps the window's newest inputs for the next step. A zero buffer (a reset)
    is the causal zero padding. The variable is not tracked as a weight of the
    layer (the copy's weights stay the model's); `conv_buffer` finds it.
    """
    pad = causal_padding(layer)
    channels = int(layer.kernel.shape[1]) * int(getattr(layer, "groups", 1))
    buffer = keras.Variable(
        np.zeros((1, pad * channels), dtype=np.float32),
        trainable=False,
        dtype="float32",
        name=f"{layer.name}_input_buffer",
    )
    object.__setattr__(layer, _BUFFER, buffer)

    def buffered_call(inputs: Any) -> Any:
        x = keras.ops.cast(inputs, buffer.dtype)
        held = keras.ops.reshape(keras.ops.convert_to_tensor(buffer), (1, pad, channels))
        window = keras.ops.concatenate([held, x], axis=1)
        outputs = keras.ops.conv(
            window,
            layer.kernel,
            strides=1,
            padding="valid",
            dilation_rate=layer.dilation_rate,
            data_format="channels_last",
        )
        if layer.use_bias:
            outputs = keras.ops.add(outputs, keras.ops.reshape(layer.bias, (1, 1, layer.filters)))
        if layer.activation is not None:
            outputs = layer.activation(outputs)
        buffer.assign(keras.ops.reshape(window[:, -pad:], (1, pad * channels)))
        return outputs

    layer.call = buffered_call


#: Cells whose output at a step is their first state (h): a masked step's output
#: is then the layer's h, which the masked step leaves unchanged.
_H_CELLS = (keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell)


def _carry_masked_output(layer: keras.layers.RNN) -> None:
    """Make the one-step output of a masked step what the whole sequence gives.

    Keras keeps an RNN's states through a masked step (all features equal to
    a `Masking` layer's mask_value) and outputs the previous step's output;
    but the previous step of a one-step call is not there, so the batch-1
    copy outputs zeros (keras/src/backend/tensorflow/rnn.py: `prev_output` of
    step 0). The previous output of an LSTM, GRU or SimpleRNN cell (of the last
    cell of a stack) is its h, which the copy holds in a state variable: the
    layer's call is wrapped to output that h on a masked step. A cell of
    another kind fails the self-check's trace if a mask reaches it. With
    `zero_output_for_mask=True` Keras outputs zeros, as the copy does.
    """
    if layer.zero_output_for_mask:
        return
    call = layer.call

    def masked_call(
        sequences: Any, initial_state: Any = None, mask: Any = None, training: Any = False
    ) -> Any:
        if mask is None:
            return call(sequences, initial_state=initial_state, mask=mask, training=training)
        cell, states = layer.cell, layer.states
        if isinstance(cell, keras.layers.StackedRNNCells):
            cell, states = cell.cells[-1], states[-1]
        if initial_state is not None or not isinstance(cell, _H_CELLS):
            raise NotImplementedError(
                f"recurrent layer {layer.name!r} receives a mask; lstmd serves masked "
                "LSTM, GRU and SimpleRNN cells without an initial_state only"
            )
        prev = keras.ops.convert_to_tensor(keras.tree.flatten(states)[0])  # read before the call assigns
        out = call(sequences, initial_state=initial_state, mask=mask, training=training)
        rest: tuple[Any, ...] = ()
        if layer.return_state:
            out, *more = out
            rest = tuple(more)
        keep = keras.ops.expand_dims(keras.ops.cast(mask[:, -1], "bool"), -1)  # (1, 1): this step unmasked
        if layer.return_sequences:
            out = keras.ops.where(keras.ops.expand_dims(keep, 1), out, keras.ops.expand_dims(prev, 1))
        else:
            out = keras.ops.where(keep, out, prev)
        return (out, *rest) if rest else out

    layer.call = masked_call


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
    for layer in _walk_layers(model):
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
