"""The layer compiler: a Keras model's one time step as a plan of kernel operations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from daemon.inference.engines.fast.activations import numpy_activation
from daemon.inference.engines.fast.conv import CausalConvOp
from daemon.inference.engines.fast.kernels import (
    ActivationOp,
    AffineOp,
    BatchNormOp,
    Cell,
    DenseOp,
    GRUKernel,
    LayerNormOp,
    LSTMKernel,
    MaskedValuesOp,
    MaskOp,
    MergeOp,
    NormalizationOp,
    Op,
    RecurrentOp,
    Rows,
    SimpleRNNKernel,
    describe,
    weights,
)
from daemon.inference.engines.fast.types import Array, UnsupportedModel
from daemon.inference.layer_calls import causal_padding, conv_buffer, layer_states
from daemon.inference.servable import ServableModel

_CELLS: dict[type, Callable[[Any, str, Rows], Cell]] = {
    keras.layers.LSTMCell: LSTMKernel,
    keras.layers.GRUCell: GRUKernel,
    keras.layers.SimpleRNNCell: SimpleRNNKernel,
}
_RNN_LAYERS = (keras.layers.RNN, keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
_IDENTITIES = tuple(
    cls
    for cls in (
        getattr(keras.layers, name, None)
        for name in (
            "Dropout",
            "SpatialDropout1D",
            "GaussianNoise",
            "GaussianDropout",
            "AlphaDropout",
            "ActivityRegularization",
            "Identity",
        )
    )
    if isinstance(cls, type)
)

_MERGES: dict[type, str] = {
    keras.layers.Add: "add",
    keras.layers.Subtract: "subtract",
    keras.layers.Multiply: "multiply",
    keras.layers.Average: "average",
    keras.layers.Maximum: "maximum",
    keras.layers.Minimum: "minimum",
}


@dataclass
class Plan:
    """The model as a list of operations over registers: register 0 is the
    wave's input; `outputs` lists, per model output in `keras.tree.flatten`
    order, its register and width; `rows` is how all its products cut a wave
    into rows (the engine's start-up self-test may make it stricter)."""

    ops: list[Op]
    n_registers: int
    outputs: list[tuple[int, int]]
    rows: Rows


class _Compiler:
    def __init__(self, model: ServableModel) -> None:
        self.model = model
        self.ops: list[Op] = []
        self.rows = Rows()
        self.n_registers = 1
        self.widths: dict[int, int] = {0: model.n_features}
        # Where each recurrent layer's states (a causal Conv1D's buffer) start in
        # the model's state list.
        self.state_index: dict[int, int] = {}
        k = 0
        for layer in model.stateful_layers:
            self.state_index[id(layer)] = k
            k += len(layer_states(layer))
        self.seen_rnns: set[int] = set()
        #: The register of the (one) Masking layer's mask, once compiled.
        self.mask: int | None = None

    def plan(self) -> Plan:
        net = self.model.stateful
        outputs = self.graph(net, 0)
        width = sum(self.widths[r] for r in outputs)
        if width != self.model.output_width:
            raise UnsupportedModel(
                f"the fast engine computes {width} output values per step, the model has "
                f"{self.model.output_width}"
            )
        return Plan(self.ops, self.n_registers, [(r, self.widths[r]) for r in outputs], self.rows)

    def graph(self, net: Any, input_register: int) -> list[int]:
        """Compile a (sub)model whose input is in `input_register`; its output registers."""
        inputs = list(net.inputs)
        if len(inputs) != 1:
            raise UnsupportedModel(f"model {net.name!r} has {len(inputs)} inputs")
        env: dict[int, int] = {id(inputs[0]): input_register}
        return [self.tensor(t, env) for t in net.outputs]

    def tensor(self, t: Any, env: dict[int, int]) -> int:
        """The register holding KerasTensor `t`, compiling what produces it."""
        if id(t) in env:
            return env[id(t)]
        history = getattr(t, "_keras_history", None)
        if history is None:
            raise UnsupportedModel(f"the model's graph has a tensor {t!r} of unknown origin")
        layer, node_index, tensor_index = history
        node = layer._inbound_nodes[node_index]
        what = describe(layer)
        if isinstance(layer, keras.layers.InputLayer):
            raise UnsupportedModel(f"{what} is a second input of the model")
        if not isinstance(layer, keras.layers.Layer):
            raise UnsupportedModel(
                f"operation {layer.name!r} ({type(layer).__name__}) is not supported by the fast engine"
            )
        # The data inputs are the call's positional arguments (a merge's is a
        # list); a mask Keras passes along is a keyword argument, handled below.
        args = keras.tree.flatten(node.arguments.args)
        ins = [a for a in args if isinstance(a, keras.KerasTensor)]
        if len(ins) != len(args) or not ins:
            raise UnsupportedModel(f"{what} is called with arguments that are not tensors")
        masked = False
        for key, value in node.arguments.kwargs.items():
            if key == "training" or value is None:
                continue
            if key == "mask":
                masked = True
                continue
            raise UnsupportedModel(f"{what} is called with {key}=; the fast engine does not support it")
        srcs = [self.tensor(x, env) for x in ins]
        dst: int
        if isinstance(layer, keras.Model):
            if len(srcs) != 1:
                raise UnsupportedModel(f"{what} is a nested model with {len(srcs)} inputs")
            if masked:
                raise UnsupportedModel(f"{what} is a nested model receiving a mask")
            outs = self.graph(layer, srcs[0])
            if len(outs) != len(node.output_tensors):
                raise UnsupportedModel(f"{what}: {len(outs)} outputs for {len(node.output_tensors)} tensors")
            dst = outs[tensor_index]
        else:
            if len(node.output_tensors) != 1:
                raise UnsupportedModel(f"{what} has {len(node.output_tensors)} outputs (return_state?)")
            if len(srcs) != 1:
                dst = self.merge(layer, srcs, [len(x.shape) for x in ins], what)
            else:
                rank = len(ins[0].shape)
                if isinstance(layer, _RNN_LAYERS):
                    dst = self.recurrent(layer, srcs[0], what, masked=masked)
                elif type(layer) is keras.layers.Conv1D:
                    dst = self.conv(layer, srcs[0], what, masked=masked)
                else:
                    # Per-step layers ignore a mask at inference (a BatchNormalization
                    # reads it only when training); Keras passes it on unchanged.
                    dst = self.layer(layer, srcs[0], what, rank)
        env[id(t)] = dst
        return dst

    def new_register(self, width: int) -> int:
        reg = self.n_registers
        self.n_registers += 1
        self.widths[reg] = width
        return reg

    def layer(self, layer: Any, src: int, what: str, rank: int) -> int:
        """Compile a per-step layer whose input, of rank `rank`, is in `src`."""
        kind = type(layer)
        width = self.widths[src]
        if getattr(layer, "quantization_mode", None) is not None:
            raise UnsupportedModel(f"{what} is quantized; the fast engine computes in float32")
        if getattr(layer, "lora_enabled", False):
            raise UnsupportedModel(f"{what} has LoRA weights; the fast engine does not support them")
        if getattr(layer, "compute_dtype", "float32") != "float32":
            raise UnsupportedModel(
                f"{what} computes in {layer.compute_dtype}; the fast engine computes in float32"
            )
        if kind in _IDENTITIES:
            return src
        if kind is keras.layers.Dense:
            kernel = weights(layer.kernel, what)
            bias = weights(layer.bias, what) if layer.use_bias else None
            if kernel.shape[0] != width:
                raise UnsupportedModel(f"{what} has an input of {kernel.shape[0]}, expected {width}")
            dst = self.new_register(int(kernel.shape[1]))
            act = numpy_activation(layer.activation, what)
            self.ops.append(DenseOp(src, dst, kernel, bias, act, self.rows))
            return dst
        if kind is keras.layers.Activation:
            dst = self.new_register(width)
            act = numpy_activation(layer.activation, what)
            self.ops.append(ActivationOp(src, dst, width, act))
            return dst
        if kind is keras.layers.TimeDistributed:
            # The inner layer sees each step as a row: the same computation.
            inner = layer.layer
            if isinstance(inner, (*_RNN_LAYERS, keras.Model)):
                raise UnsupportedModel(f"{what} wraps {describe(inner)}")
            return self.layer(inner, src, f"{describe(inner)} in {what}", rank - 1)
        if kind is keras.layers.Rescaling:
            scale = _per_feature(layer.scale, width, what, "scale")
            offset = _per_feature(layer.offset, width, what, "offset")
            dst = self.new_register(width)
            self.ops.append(AffineOp(src, dst, width, scale, offset))
            return dst
        if kind is keras.layers.Normalization:
            return self.normalization(layer, src, what)
        if kind is keras.layers.BatchNormalization:
            if layer.axis not in (-1, rank - 1):
                raise UnsupportedModel(f"{what} normalizes axis {layer.axis}, not the feature axis")
            mean = weights(layer.moving_mean, what)
            variance = weights(layer.moving_variance, what)
            # tf.nn.batch_normalization: inv = rsqrt(var + eps) * gamma; x * inv + (beta - mean * inv).
            inv = (np.float32(1.0) / np.sqrt(variance + np.float32(layer.epsilon))).astype(np.float32)
            if layer.scale:
                inv = inv * weights(layer.gamma, what)
            shift = -mean * inv
            if layer.center:
                shift = weights(layer.beta, what) - mean * inv
            dst = self.new_register(width)
            self.ops.append(BatchNormOp(src, dst, width, _f32(inv, width, what), _f32(shift, width, what)))
            return dst
        if kind is keras.layers.LayerNormalization:
            axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
            if sorted(a % rank for a in axes) != [rank - 1]:
                raise UnsupportedModel(f"{what} normalizes axes {layer.axis}, not only the feature axis")
            if getattr(layer, "rms_scaling", False):
                raise UnsupportedModel(f"{what} has rms_scaling=True; the fast engine does not support it")
            gamma = _f32(weights(layer.gamma, what), width, what) if layer.gamma is not None else None
            beta = _f32(weights(layer.beta, what), width, what) if layer.beta is not None else None
            dst = self.new_register(width)
            self.ops.append(LayerNormOp(src, dst, width, gamma, beta, float(layer.epsilon)))
            return dst
        if kind is keras.layers.Masking:
            if self.mask is not None:
                raise UnsupportedModel(f"{what} is a second Masking; the fast engine serves one mask")
            self.mask = self.new_register(1)
            self.ops.append(MaskOp(src, self.mask, float(layer.mask_value)))
            dst = self.new_register(width)
            self.ops.append(MaskedValuesOp(src, self.mask, dst, width))
            return dst
        raise UnsupportedModel(f"{what} is not supported by the fast engine")

    def normalization(self, layer: Any, src: int, what: str) -> int:
        width = self.widths[src]
        if layer.mean is None or layer.variance is None:
            raise UnsupportedModel(f"{what} has no mean and variance (not adapted nor given)")
        mean = np.asarray(keras.ops.convert_to_numpy(layer.mean))
        variance = np.asarray(keras.ops.convert_to_numpy(layer.variance))
        # The broadcast shape (1, ..., 1, width or 1): the statistics are per feature.
        for name, arr in (("mean", mean), ("variance", variance)):
            if arr.dtype != np.float32 or any(d != 1 for d in arr.shape[:-1]):
                raise UnsupportedModel(f"{what} has a {name} of shape {arr.shape} ({arr.dtype})")
        # max(sqrt(variance), epsilon) as Keras computes it at each call, in float32.
        denominator = np.maximum(np.sqrt(variance), np.float32(keras.backend.epsilon()))
        dst = self.new_register(width)
        self.ops.append(
            NormalizationOp(
                src,
                dst,
                width,
                _f32(mean.reshape(-1), width, what),
                _f32(denominator.reshape(-1), width, what),
                bool(layer.invert),
            )
        )
        return dst

    def merge(self, layer: Any, srcs: list[int], ranks: list[int], what: str) -> int:
        widths = [self.widths[r] for r in srcs]
        kind = type(layer)
        if kind is keras.layers.Concatenate:
            if len(set(ranks)) != 1 or layer.axis not in (-1, ranks[0] - 1):
                raise UnsupportedModel(f"{what} concatenates on axis {layer.axis}, not the feature axis")
            dst = self.new_register(sum(widths))
            self.ops.append(MergeOp(tuple(srcs), dst, "concatenate", sum(widths)))
            return dst
        name = _MERGES.get(kind)
        if name is None:
            raise UnsupportedModel(
                f"{what} takes {len(srcs)} tensor inputs and is not a merge the fast engine supports"
            )
        if len(set(widths)) != 1 or len(set(ranks)) != 1:
            raise UnsupportedModel(
                f"{what} merges inputs of widths {widths} (ranks {ranks}); it needs equal shapes"
            )
        dst = self.new_register(widths[0])
        self.ops.append(MergeOp(tuple(srcs), dst, name, widths[0]))
        return dst

    def recurrent(self, layer: Any, src: int, what: str, *, masked: bool = False) -> int:
        if id(layer) in self.seen_rnns:
            raise UnsupportedModel(f"{what} is applied twice in the model")
        self.seen_rnns.add(id(layer))
        if layer.go_backwards:
            raise UnsupportedModel(f"{what} has go_backwards=True")
        if layer.return_state:
            raise UnsupportedModel(f"{what} has return_state=True; the fast engine does not support it")
        if id(layer) not in self.state_index:
            raise UnsupportedModel(f"{what} is not among the model's stateful recurrent layers")
        if masked and self.mask is None:
            # Only a Masking layer makes masks among the layers compiled here.
            raise UnsupportedModel(f"{what} receives a mask that is not a Masking layer's")
        cell = layer.cell
        raw = list(cell.cells) if type(cell) is keras.layers.StackedRNNCells else [cell]
        cells: list[Cell] = []
        width = self.widths[src]
        for c in raw:
            make = _CELLS.get(type(c))
            cell_what = what if len(raw) == 1 else f"{what} cell {c.name!r} ({type(c).__name__})"
            if make is None:
                raise UnsupportedModel(f"{cell_what} has a cell the fast engine does not support")
            compiled = make(c, cell_what, self.rows)
            kernel = getattr(compiled, "kernel", None)
            if kernel is not None and kernel.shape[0] != width:
                raise UnsupportedModel(f"{cell_what} has an input of {kernel.shape[0]}, expected {width}")
            cells.append(compiled)
            width = int(c.units)
        start = self.state_index[id(layer)]
        n_states = sum(c.n_states for c in cells)
        have = len(keras.tree.flatten(layer.states))
        if n_states != have:
            raise UnsupportedModel(f"{what} has {have} states, expected {n_states}")
        dst = self.new_register(width)
        mask = self.mask if masked else None
        self.ops.append(RecurrentOp(src, dst, cells, start, mask, bool(layer.zero_output_for_mask)))
        return dst

    def conv(self, layer: Any, src: int, what: str, *, masked: bool) -> int:
        """A Conv1D: causal (its buffer a state of the sequence) or of one-step kernel."""
        if id(layer) in self.seen_rnns:
            raise UnsupportedModel(f"{what} is applied twice in the model")
        self.seen_rnns.add(id(layer))
        if masked:
            raise UnsupportedModel(f"{what} receives a mask; the fast engine does not support it")
        if int(layer.strides[0]) != 1 or layer.data_format != "channels_last":
            raise UnsupportedModel(f"{what} has strides {layer.strides} ({layer.data_format})")
        if int(getattr(layer, "groups", 1)) != 1:
            raise UnsupportedModel(f"{what} has groups={layer.groups}; the fast engine does not support it")
        pad = causal_padding(layer)
        if pad > 0 and (layer.padding != "causal" or conv_buffer(layer) is None):
            raise UnsupportedModel(f"{what} has padding={layer.padding!r} and no input buffer")
        kernel = weights(layer.kernel, what)  # (kernel_size, channels, filters)
        width = self.widths[src]
        if kernel.shape[1] != width:
            raise UnsupportedModel(f"{what} has an input of {kernel.shape[1]}, expected {width}")
        bias = weights(layer.bias, what) if layer.use_bias else None
        act = numpy_activation(layer.activation, what)
        dst = self.new_register(int(kernel.shape[2]))
        if pad == 0:  # one step: a Dense of the kernel's only tap
            self.ops.append(DenseOp(src, dst, np.ascontiguousarray(kernel[-1]), bias, act, self.rows))
            return dst
        state = self.state_index.get(id(layer))
        if state is None:
            raise UnsupportedModel(f"{what} is not among the model's stateful layers")
        buffer_shape = tuple(int(d) for d in conv_buffer(layer).shape)
        if buffer_shape != (1, pad * width):
            raise UnsupportedModel(
                f"{what} has a buffer of shape {buffer_shape}, expected (1, {pad * width})"
            )
        self.ops.append(
            CausalConvOp(src, dst, kernel, bias, act, int(layer.dilation_rate[0]), state, self.rows)
        )
        return dst


def _f32(arr: Any, width: int, what: str) -> Array:
    """A per-feature float32 vector of `width` values (a single value is broadcast)."""
    out = np.asarray(arr, dtype=np.float32).reshape(-1)
    if out.size == 1:
        out = np.full(width, out[0], dtype=np.float32)
    if out.shape != (width,):
        raise UnsupportedModel(f"{what} has {out.size} per-feature values for {width} features")
    return np.ascontiguousarray(out)


def _per_feature(value: Any, width: int, what: str, name: str) -> Array | None:
    """A Rescaling's scale or offset as a float32 vector; None for the neutral one."""
    if isinstance(value, int | float) and value == (1 if name == "scale" else 0):
        return None
    try:
        return _f32(value, width, what)
    except (TypeError, ValueError) as exc:
        raise UnsupportedModel(f"{what} has a {name} the fast engine cannot read: {exc}") from exc


def compile_model(model: ServableModel) -> Plan:
    """The model's step as a Plan, or UnsupportedModel naming what is not supported."""
    return _Compiler(model).plan()
