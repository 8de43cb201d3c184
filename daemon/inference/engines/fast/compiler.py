"""The layer compiler: a Keras model's one time step as a plan of kernel operations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras

from daemon.inference.engines.fast.activations import numpy_activation
from daemon.inference.engines.fast.kernels import (
    ActivationOp,
    Cell,
    DenseOp,
    GRUKernel,
    LSTMKernel,
    Op,
    RecurrentOp,
    SimpleRNNKernel,
    describe,
    weights,
)
from daemon.inference.engines.fast.types import UnsupportedModel
from daemon.inference.model import ServableModel

_CELLS: dict[type, Callable[[Any, str], Cell]] = {
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


@dataclass
class Plan:
    """The model as a list of operations over registers: register 0 is the
    wave's input; `outputs` lists, per model output in `keras.tree.flatten`
    order, its register and width."""

    ops: list[Op]
    n_registers: int
    outputs: list[tuple[int, int]]


class _Compiler:
    def __init__(self, model: ServableModel) -> None:
        self.model = model
        self.ops: list[Op] = []
        self.n_registers = 1
        self.widths: dict[int, int] = {0: model.n_features}
        # Where each recurrent layer's states start in the model's state list.
        self.state_index: dict[int, int] = {}
        k = 0
        for layer in model.stateful_layers:
            self.state_index[id(layer)] = k
            k += len(keras.tree.flatten(layer.states))
        self.seen_rnns: set[int] = set()

    def plan(self) -> Plan:
        net = self.model.stateful
        outputs = self.graph(net, 0)
        width = sum(self.widths[r] for r in outputs)
        if width != self.model.output_width:
            raise UnsupportedModel(
                f"the fast engine computes {width} output values per step, the model has "
                f"{self.model.output_width}"
            )
        return Plan(self.ops, self.n_registers, [(r, self.widths[r]) for r in outputs])

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
        ins = list(node.input_tensors)
        if len(ins) != 1:
            raise UnsupportedModel(
                f"{what} takes {len(ins)} tensor inputs; the fast engine computes chains "
                "of single-input layers"
            )
        for key, value in node.arguments.kwargs.items():
            if key == "training" or (key == "mask" and value is None):
                continue
            if value is not None:
                raise UnsupportedModel(f"{what} is called with {key}=; the fast engine does not support it")
        src = self.tensor(ins[0], env)
        dst: int
        if isinstance(layer, keras.Model):
            outs = self.graph(layer, src)
            if len(outs) != len(node.output_tensors):
                raise UnsupportedModel(f"{what}: {len(outs)} outputs for {len(node.output_tensors)} tensors")
            dst = outs[tensor_index]
        else:
            if len(node.output_tensors) != 1:
                raise UnsupportedModel(f"{what} has {len(node.output_tensors)} outputs (return_state?)")
            dst = self.layer(layer, src, what)
        env[id(t)] = dst
        return dst

    def new_register(self, width: int) -> int:
        reg = self.n_registers
        self.n_registers += 1
        self.widths[reg] = width
        return reg

    def layer(self, layer: Any, src: int, what: str) -> int:
        kind = type(layer)
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
            if kernel.shape[0] != self.widths[src]:
                raise UnsupportedModel(
                    f"{what} has an input of {kernel.shape[0]}, expected {self.widths[src]}"
                )
            dst = self.new_register(int(kernel.shape[1]))
            act = numpy_activation(layer.activation, what)
            self.ops.append(DenseOp(src, dst, kernel, bias, act))
            return dst
        if kind is keras.layers.Activation:
            dst = self.new_register(self.widths[src])
            act = numpy_activation(layer.activation, what)
            self.ops.append(ActivationOp(src, dst, self.widths[src], act))
            return dst
        if kind in _RNN_LAYERS:
            return self.recurrent(layer, src, what)
        raise UnsupportedModel(f"{what} is not supported by the fast engine")

    def recurrent(self, layer: Any, src: int, what: str) -> int:
        if id(layer) in self.seen_rnns:
            raise UnsupportedModel(f"{what} is applied twice in the model")
        self.seen_rnns.add(id(layer))
        if layer.go_backwards:
            raise UnsupportedModel(f"{what} has go_backwards=True")
        if layer.return_state:
            raise UnsupportedModel(f"{what} has return_state=True; the fast engine does not support it")
        if id(layer) not in self.state_index:
            raise UnsupportedModel(f"{what} is not among the model's stateful recurrent layers")
        cell = layer.cell
        raw = list(cell.cells) if type(cell) is keras.layers.StackedRNNCells else [cell]
        cells: list[Cell] = []
        width = self.widths[src]
        for c in raw:
            make = _CELLS.get(type(c))
            cell_what = what if len(raw) == 1 else f"{what} cell {c.name!r} ({type(c).__name__})"
            if make is None:
                raise UnsupportedModel(f"{cell_what} has a cell the fast engine does not support")
            compiled = make(c, cell_what)
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
        self.ops.append(RecurrentOp(src, dst, cells, start))
        return dst


def compile_model(model: ServableModel) -> Plan:
    """The model's step as a Plan, or UnsupportedModel naming what is not supported."""
    return _Compiler(model).plan()
