"""The fast engine: explicit-state NumPy steps of many sequences at once.

`FastEngine` reads the weights of the model's layers once, at construction, and
computes one time step of N sequences as a few float32 matrix products: the
slots' states are stacked into (N, units) matrices, every layer is applied to
the whole wave, and the new states are split back into fresh per-slot arrays.
It serves a model whose graph is a tree of single-input layers from the one
input (a Sequential chain, or a functional model whose output heads branch off
anywhere, nested models included) made of:

* recurrent layers: `LSTM`, `GRU` (`reset_after` True or False), `SimpleRNN`, and
  `RNN` over an `LSTMCell`, `GRUCell`, `SimpleRNNCell` or a stack of them, with
  or without biases, with any activations of `ACTIVATIONS`;
* `Dense` (any activation of `ACTIVATIONS`), `Activation`;
* the layers that are the identity at inference: `Dropout`, `SpatialDropout1D`,
  `GaussianNoise`, `GaussianDropout`, `AlphaDropout`, `ActivityRegularization`,
  `Identity`; and `InputLayer`.

Anything else (another layer or operation, a layer taking several inputs or a
mask, `return_state`, a quantized, LoRA or non-float32 layer, an activation
that is not one of Keras's built-ins listed in `ACTIVATIONS`) raises
`UnsupportedModel`, whose message names the layer and its class: `make_engine`
(daemon/engines.py) then falls back to the Keras engine.

Why NumPy and not a compiled TensorFlow function. Measured on the 2-core
machine this was written on (medians of 3 runs of 300-2000 calls; an LSTM step
plus a Dense(1, sigmoid) head on (N, units) state matrices, the arithmetic
alone, NumPy with one BLAS thread; numbers per call):

    model                  N     NumPy    tf.function
    LSTM(32), 1 feature    1     13 us    290 us
                           64    35 us    315 us
                           1000  310 us   610 us
    LSTM(64), 16 features  1     14 us    300 us
                           64    50 us    335 us
                           1000  1.37 ms  0.99-1.27 ms

A `tf.function` call costs ~0.3 ms of fixed overhead here whatever the work,
which is the cost the fast engine exists to remove; NumPy's is ~10 us. TensorFlow
only catches up at 1000 sequences of the larger model, where it uses both cores
(which the daemon shares with the Kafka client). NumPy keeps the processor
single-threaded and simple (no tracing, no retracing on a new wave size).
Parity with Keras's TensorFlow kernels is ~1e-7 per step. The whole `step`
(stacking the slots' states, the layers, fresh per-slot states) then costs
~21 us for one sequence, ~1.4-1.7 us per sequence for 64 and ~1.0-1.3 us per
sequence for 1000, against ~0.4-0.7 ms per event for `predict_on_batch`
(`lstmd bench` measures both).

BLAS threads. NumPy's OpenBLAS splits a product of a few hundred rows over
threads; on a 2-core machine whose other core is busy (another process, the
Kafka client, a CPU-limited pod) a wave then waits for a descheduled thread:
the same (1000 x 80) @ (80 x 256) product measured a 170 us median but an 8 ms
90th percentile with 2 threads, and 320 us / 350 us with one. `FastEngine`
therefore sets OpenBLAS to one thread (`limit_blas_threads`, process-wide, best
effort) unless `OPENBLAS_NUM_THREADS` is set, which then wins.

Numerics. Everything stays float32, like Keras's. The weights are Keras's
(LSTM gates i, f, c, o, whose columns are only regrouped as i, f, o, c; GRU z,
r, h with both reset_after semantics) and the formulas are term for term those
of keras/src/layers/rnn/{lstm,gru,simple_rnn}.py at inference (no dropout); the
sigmoid is computed as 0.5 * tanh(x / 2) + 0.5 (within 1e-7 of TensorFlow's,
and no overflow for large |x|).
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import keras
import numpy as np

from daemon.engines import StateSlot, StateTensors, check_batch, check_state, zero_state_for
from daemon.model import ServableModel

Array = np.ndarray
_F32 = np.dtype(np.float32)
Activation = Callable[[Array], Array]


class UnsupportedModel(ValueError):
    """The fast engine cannot compute this model; the message says why."""


# ------------------------------------------------------------------ activations
#
# NumPy versions of Keras's built-in activations with their default parameters
# (what a layer holds when given the activation by name), float32 in and out,
# written after keras/src/backend/tensorflow/nn.py. Each is given a scratch array
# that it may overwrite, and returns the result: that array or a new one.

_SELU_ALPHA = np.float32(1.6732632423543772848170429916717)
_SELU_SCALE = np.float32(1.0507009873554804934193349852946)


def _linear(x: Array) -> Array:
    return x


def _tanh(x: Array) -> Array:
    out: Array = np.tanh(x, out=x)
    return out


def _sigmoid(x: Array) -> Array:
    x *= np.float32(0.5)
    np.tanh(x, out=x)
    x *= np.float32(0.5)
    x += np.float32(0.5)
    return x


def _hard_sigmoid(x: Array) -> Array:
    # relu6(x + 3) / 6, as TensorFlow's.
    x += np.float32(3.0)
    np.maximum(x, np.float32(0.0), out=x)
    np.minimum(x, np.float32(6.0), out=x)
    x /= np.float32(6.0)
    return x


def _relu(x: Array) -> Array:
    out: Array = np.maximum(x, np.float32(0.0), out=x)
    return out


def _relu6(x: Array) -> Array:
    out: Array = np.minimum(np.maximum(x, np.float32(0.0)), np.float32(6.0))
    return out


def _leaky_relu(x: Array) -> Array:
    out: Array = np.maximum(x * np.float32(0.2), x)
    return out


def _elu(x: Array) -> Array:
    return np.where(x > 0, x, np.expm1(np.minimum(x, np.float32(0.0))))


def _selu(x: Array) -> Array:
    neg = _SELU_ALPHA * np.expm1(np.minimum(x, np.float32(0.0)))
    return _SELU_SCALE * np.where(x > 0, x, neg)


def _softplus(x: Array) -> Array:
    out: Array = np.logaddexp(np.float32(0.0), x)
    return out


def _softsign(x: Array) -> Array:
    out: Array = x / (np.float32(1.0) + np.abs(x))
    return out


def _exponential(x: Array) -> Array:
    out: Array = np.exp(x)
    return out


def _silu(x: Array) -> Array:
    out: Array = x * _sigmoid(x.copy())
    return out


def _erf(x: Array) -> Array:
    """erf in float64 from the complementary error function's Chebyshev fit
    (Numerical Recipes' erfcc): relative error below 1.2e-7 everywhere."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    out: Array = np.where(x >= 0, 1.0 - erfc, erfc - 1.0)
    return out


def _gelu(x: Array) -> Array:
    # Keras's default is the exact GELU (approximate=False).
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / np.sqrt(2.0)))).astype(np.float32)


def _hard_silu(x: Array) -> Array:
    out: Array = x * _hard_sigmoid(x.copy())
    return out


def _mish(x: Array) -> Array:
    out: Array = x * np.tanh(_softplus(x))
    return out


def _log_sigmoid(x: Array) -> Array:
    out: Array = -np.logaddexp(np.float32(0.0), -x)
    return out


def _celu(x: Array) -> Array:
    out: Array = np.maximum(x, np.float32(0.0)) + np.expm1(np.minimum(x, np.float32(0.0)))
    return out


def _hard_tanh(x: Array) -> Array:
    out: Array = np.minimum(np.maximum(x, np.float32(-1.0)), np.float32(1.0))
    return out


def _tanh_shrink(x: Array) -> Array:
    out: Array = x - np.tanh(x)
    return out


def _squareplus(x: Array) -> Array:
    out: Array = (x + np.sqrt(x * x + np.float32(4.0))) / np.float32(2.0)
    return out


def _sparse_plus(x: Array) -> Array:
    mid = np.float32(0.25) * np.square(x + np.float32(1.0))
    return np.where(x <= -1, np.float32(0.0), np.where(x < 1, mid, x))


def _sparse_sigmoid(x: Array) -> Array:
    mid = np.float32(0.5) * (x + np.float32(1.0))
    return np.where(x <= -1, np.float32(0.0), np.where(x >= 1, np.float32(1.0), mid))


def _soft_shrink(x: Array) -> Array:
    half = np.float32(0.5)
    return np.where(x > half, x - half, np.where(x < -half, x + half, np.float32(0.0)))


def _hard_shrink(x: Array) -> Array:
    return np.where(np.abs(x) > np.float32(0.5), x, np.float32(0.0))


def _softmax(x: Array) -> Array:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    out: Array = e / np.sum(e, axis=-1, keepdims=True)
    return out


def _log_softmax(x: Array) -> Array:
    s = x - np.max(x, axis=-1, keepdims=True)
    out: Array = s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))
    return out


#: Keras's activation names (aliases included) -> NumPy implementations. An
#: activation function that is not `keras.activations.get(name)` of one of these
#: names (a custom function, a partial, a layer) is refused.
ACTIVATIONS: dict[str, Activation] = {
    "linear": _linear,
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "relu": _relu,
    "relu6": _relu6,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "selu": _selu,
    "softplus": _softplus,
    "softsign": _softsign,
    "exponential": _exponential,
    "silu": _silu,
    "swish": _silu,
    "gelu": _gelu,
    "hard_silu": _hard_silu,
    "hard_swish": _hard_silu,
    "mish": _mish,
    "log_sigmoid": _log_sigmoid,
    "celu": _celu,
    "hard_tanh": _hard_tanh,
    "tanh_shrink": _tanh_shrink,
    "squareplus": _squareplus,
    "sparse_plus": _sparse_plus,
    "sparse_sigmoid": _sparse_sigmoid,
    "soft_shrink": _soft_shrink,
    "hard_shrink": _hard_shrink,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
}


def _keras_activations() -> dict[int, tuple[str, Activation]]:
    """id(Keras activation function) -> (name, NumPy implementation)."""
    found: dict[int, tuple[str, Activation]] = {}
    for name, impl in ACTIVATIONS.items():
        try:
            fn = keras.activations.get(name)
        except ValueError:  # not in this Keras version
            continue
        found.setdefault(id(fn), (name, impl))
    return found


def numpy_activation(fn: Any, what: str) -> Activation:
    """The NumPy implementation of the Keras activation `fn`, or UnsupportedModel."""
    if fn is None:
        return _linear
    hit = _keras_activations().get(id(fn))
    if hit is None:
        label = getattr(fn, "__name__", None) or type(fn).__name__
        raise UnsupportedModel(
            f"{what} has the activation {label!r}, which the fast engine does not implement "
            f"(it implements Keras's built-in {', '.join(sorted(ACTIVATIONS))})"
        )
    return hit[1]


# ------------------------------------------------------------------ BLAS threads

_OPENBLAS_SETTERS = (
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
)


def limit_blas_threads(threads: int = 1) -> bool:
    """Best effort: make the OpenBLAS that NumPy loaded use `threads` threads.

    Process-wide. Does nothing (returns False) when `OPENBLAS_NUM_THREADS` is
    set (the operator's choice wins), off Linux, or when NumPy's BLAS is not an
    OpenBLAS found among the process's mapped libraries.
    """
    if os.environ.get("OPENBLAS_NUM_THREADS"):
        return False
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({
                line.split()[-1] for line in maps
                if "openblas" in line.lower() and line.split()[-1].startswith("/")
            })
    except OSError:
        return False
    done = False
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _OPENBLAS_SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                setter(int(threads))
                done = True
                break
    return done


# ------------------------------------------------------------------ layers

def _weights(var: Any, what: str) -> Array:
    arr = np.asarray(keras.ops.convert_to_numpy(var))
    if arr.dtype != np.float32:
        raise UnsupportedModel(f"{what} has {arr.dtype} weights; the fast engine computes in float32")
    return np.ascontiguousarray(arr)


def _describe(layer: Any) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


class _Scratch:
    """A kernel's reusable float32 work buffers, one per declared width.

    Reusing them instead of allocating every temporary at every step matters
    with large waves: glibc returns freed megabytes to the system and faults
    them in again at the next step, which doubled the time of a 1000-sequence
    LSTM(64) step in a trial. Every result left in a buffer is consumed (copied
    into the engine's outputs and the slots' states) before the next wave."""

    def __init__(self, *widths: int) -> None:
        self.widths = widths
        self.capacity = 0
        self.buffers: list[Array] = []

    def take(self, n: int) -> list[Array]:
        """The first n rows of each buffer."""
        if n > self.capacity:
            self.capacity = max(n, 2 * self.capacity)
            self.buffers = [np.empty((self.capacity, w), dtype=np.float32) for w in self.widths]
        return [b[:n] for b in self.buffers]


class _Cell:
    """One recurrent cell: (x, its states) -> (output, its new states)."""

    n_states = 1

    def __call__(self, x: Array, states: list[Array]) -> tuple[Array, list[Array]]:
        raise NotImplementedError


class _LSTM(_Cell):
    n_states = 2

    def __init__(self, cell: Any, what: str) -> None:
        u = self.units = int(cell.units)
        self.act = numpy_activation(cell.activation, what)
        self.rec = numpy_activation(cell.recurrent_activation, f"{what} (recurrent)")
        # Columns reordered from Keras's i, f, c, o to i, f, o, c: the three gates
        # under the recurrent activation are then one contiguous block.
        order = np.r_[0 : 2 * u, 3 * u : 4 * u, 2 * u : 3 * u]
        kernel = _weights(cell.kernel, what)[:, order]
        recurrent = _weights(cell.recurrent_kernel, what)[:, order]
        bias = _weights(cell.bias, what)[order] if cell.use_bias else None
        # The usual sigmoid gates and tanh: sigmoid(z) = tanh(z / 2) / 2 + 1/2, so
        # with the gates' weights halved (exact in binary floating point) one
        # tanh over the whole pre-activation serves all four blocks.
        self.fused = self.rec is _sigmoid and self.act is _tanh
        if self.fused:
            half = np.ones(4 * u, dtype=np.float32)
            half[: 3 * u] = 0.5
            kernel = kernel * half
            recurrent = recurrent * half
            bias = bias * half if bias is not None else None
        self.kernel = np.ascontiguousarray(kernel)
        self.recurrent = np.ascontiguousarray(recurrent)
        self.bias = np.ascontiguousarray(bias) if bias is not None else None
        self.scratch = _Scratch(4 * u, 4 * u, u, u)

    def __call__(self, x: Array, states: list[Array]) -> tuple[Array, list[Array]]:
        h, c = states
        u = self.units
        z, t, c_new, h_new = self.scratch.take(x.shape[0])
        np.matmul(x, self.kernel, out=z)
        z += np.matmul(h, self.recurrent, out=t)
        if self.bias is not None:
            z += self.bias
        if self.fused:
            np.tanh(z, out=z)
            gates = z[:, : 3 * u]
            gates *= np.float32(0.5)
            gates += np.float32(0.5)
            g = z[:, 3 * u :]
        else:
            gates = self.rec(z[:, : 3 * u])
            g = self.act(z[:, 3 * u :])
        i, f, o = gates[:, :u], gates[:, u : 2 * u], gates[:, 2 * u :]
        # c = f * c + i * g; h = o * act(c), as Keras's.
        np.multiply(f, c, out=c_new)
        c_new += np.multiply(i, g, out=t[:, :u])
        scratch = t[:, u : 2 * u]
        np.copyto(scratch, c_new)
        np.multiply(o, self.act(scratch), out=h_new)
        return h_new, [h_new, c_new]


class _GRU(_Cell):
    def __init__(self, cell: Any, what: str) -> None:
        u = self.units = int(cell.units)
        self.reset_after = bool(cell.reset_after)
        self.kernel = _weights(cell.kernel, what)
        recurrent = _weights(cell.recurrent_kernel, what)
        self.bias_in: Array | None = None
        self.bias_rec: Array | None = None
        if cell.use_bias:
            bias = _weights(cell.bias, what)
            if self.reset_after:  # (2, 3u): input and recurrent biases
                self.bias_in, self.bias_rec = np.ascontiguousarray(bias[0]), np.ascontiguousarray(bias[1])
            else:
                self.bias_in = bias
        # reset_after: the whole recurrent kernel at once; otherwise its z, r
        # part first and its h part after the reset gate.
        self.recurrent = recurrent if self.reset_after else np.ascontiguousarray(recurrent[:, : 2 * u])
        self.recurrent_h = np.ascontiguousarray(recurrent[:, 2 * u :])
        self.act = numpy_activation(cell.activation, what)
        self.rec = numpy_activation(cell.recurrent_activation, f"{what} (recurrent)")
        self.scratch = _Scratch(3 * u, self.recurrent.shape[1], u, u, u)

    def __call__(self, x: Array, states: list[Array]) -> tuple[Array, list[Array]]:
        (h,) = states
        u = self.units
        mx, mi, a, b, h_new = self.scratch.take(x.shape[0])
        np.matmul(x, self.kernel, out=mx)
        if self.bias_in is not None:
            mx += self.bias_in
        np.matmul(h, self.recurrent, out=mi)
        if self.bias_rec is not None:
            mi += self.bias_rec
        zr = mx[:, : 2 * u]
        zr += mi[:, : 2 * u]
        zr = self.rec(zr)
        z, r = zr[:, :u], zr[:, u:]
        # The reset gate applied after (reset_after) or before the recurrent product.
        if self.reset_after:
            rh = mi[:, 2 * u :]
            rh *= r
        else:
            rh = np.matmul(np.multiply(r, h, out=a), self.recurrent_h, out=b)
        hh = mx[:, 2 * u :]
        hh += rh
        hh = self.act(hh)
        # h = z * h + (1 - z) * hh, as Keras's.
        np.multiply(z, h, out=h_new)
        one_minus_z = np.subtract(np.float32(1.0), z, out=a)
        one_minus_z *= hh
        h_new += one_minus_z
        return h_new, [h_new]


class _SimpleRNN(_Cell):
    def __init__(self, cell: Any, what: str) -> None:
        self.kernel = _weights(cell.kernel, what)
        self.recurrent = _weights(cell.recurrent_kernel, what)
        self.bias = _weights(cell.bias, what) if cell.bias is not None else None
        self.act = numpy_activation(cell.activation, what)
        u = int(cell.units)
        self.scratch = _Scratch(u, u)

    def __call__(self, x: Array, states: list[Array]) -> tuple[Array, list[Array]]:
        (h,) = states
        y, t = self.scratch.take(x.shape[0])
        np.matmul(x, self.kernel, out=y)
        if self.bias is not None:
            y += self.bias
        y += np.matmul(h, self.recurrent, out=t)
        out = self.act(y)
        return out, [out]


_CELLS: dict[type, Callable[[Any, str], _Cell]] = {
    keras.layers.LSTMCell: _LSTM,
    keras.layers.GRUCell: _GRU,
    keras.layers.SimpleRNNCell: _SimpleRNN,
}
_RNN_LAYERS = (keras.layers.RNN, keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)
_IDENTITIES = tuple(
    cls for cls in (
        getattr(keras.layers, name, None)
        for name in ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout",
                     "AlphaDropout", "ActivityRegularization", "Identity")
    ) if isinstance(cls, type)
)


class _Op:
    """One layer application: registers[dst] = run(registers[src], ...); a
    recurrent one reads its states from `states_in` and leaves the new ones in
    `states_out` (lists over the model's state variables). The result may live
    in the op's scratch buffers: it is valid until the op runs again."""

    def __init__(self, src: int, dst: int) -> None:
        self.src = src
        self.dst = dst

    def run(self, x: Array, states_in: list[Array], states_out: list[Array]) -> Array:
        raise NotImplementedError


class _DenseOp(_Op):
    def __init__(self, src: int, dst: int, kernel: Array, bias: Array | None, act: Activation) -> None:
        super().__init__(src, dst)
        self.kernel = kernel
        self.bias = bias
        self.act = act
        self.scratch = _Scratch(int(kernel.shape[1]))

    def run(self, x: Array, states_in: list[Array], states_out: list[Array]) -> Array:
        (y,) = self.scratch.take(x.shape[0])
        np.matmul(x, self.kernel, out=y)
        if self.bias is not None:
            y += self.bias
        return self.act(y)


class _ActivationOp(_Op):
    def __init__(self, src: int, dst: int, width: int, act: Activation) -> None:
        super().__init__(src, dst)
        self.act = act
        self.scratch = _Scratch(width)

    def run(self, x: Array, states_in: list[Array], states_out: list[Array]) -> Array:
        (y,) = self.scratch.take(x.shape[0])
        np.copyto(y, x)  # activations overwrite their input; x may be read by another op
        return self.act(y)


class _RecurrentOp(_Op):
    def __init__(self, src: int, dst: int, cells: list[_Cell], state: int) -> None:
        super().__init__(src, dst)
        self.cells = cells
        self.state = state  # index of the first state of the first cell

    def run(self, x: Array, states_in: list[Array], states_out: list[Array]) -> Array:
        k = self.state
        for cell in self.cells:
            n = cell.n_states
            x, new = cell(x, states_in[k : k + n])
            states_out[k : k + n] = new
            k += n
        return x


@dataclass
class Plan:
    """The model as a list of operations over registers: register 0 is the
    wave's input; `outputs` lists, per model output in `keras.tree.flatten`
    order, its register and width."""

    ops: list[_Op]
    n_registers: int
    outputs: list[tuple[int, int]]


class _Compiler:
    def __init__(self, model: ServableModel) -> None:
        self.model = model
        self.ops: list[_Op] = []
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
        what = _describe(layer)
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
            kernel = _weights(layer.kernel, what)
            bias = _weights(layer.bias, what) if layer.use_bias else None
            if kernel.shape[0] != self.widths[src]:
                raise UnsupportedModel(
                    f"{what} has an input of {kernel.shape[0]}, expected {self.widths[src]}")
            dst = self.new_register(int(kernel.shape[1]))
            act = numpy_activation(layer.activation, what)
            self.ops.append(_DenseOp(src, dst, kernel, bias, act))
            return dst
        if kind is keras.layers.Activation:
            dst = self.new_register(self.widths[src])
            act = numpy_activation(layer.activation, what)
            self.ops.append(_ActivationOp(src, dst, self.widths[src], act))
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
        cells: list[_Cell] = []
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
        self.ops.append(_RecurrentOp(src, dst, cells, start))
        return dst


def compile_model(model: ServableModel) -> Plan:
    """The model's step as a Plan, or UnsupportedModel naming what is not supported."""
    return _Compiler(model).plan()


# ------------------------------------------------------------------ the engine


class FastEngine:
    """Steps a whole wave of sequences at once with NumPy (see the module docstring).

    `step` splits its slots into sub-waves so that a slot appearing several times
    is advanced in list order (the k-th occurrences of every slot form sub-wave
    k). The new state of each slot is one owned read-only float32 buffer per
    slot, the state tensors being views of it: a sequence never keeps another
    sequence's memory alive. If a step raises, the slots of the sub-waves before
    the failing one have been advanced and the others are untouched.
    """

    name = "fast"

    def __init__(self, model: ServableModel, *, blas_threads: int | None = 1) -> None:
        self.model = model
        self.plan = compile_model(model)
        self.blas_limited = limit_blas_threads(blas_threads) if blas_threads is not None else False
        self._sizes = [int(np.prod(s)) for s in model.state_shapes]
        self._zero = zero_state_for(model)
        #: Events stepped, and how many (sub-)waves they took.
        self.steps = 0
        self.waves = 0

    def step(self, slots: Sequence[StateSlot], xs: np.ndarray) -> np.ndarray:
        arr = check_batch(self.model, slots, xs)
        n = len(slots)
        out = np.empty((n, self.model.output_width), dtype=np.float32)
        if n == 0:
            return out
        with np.errstate(all="ignore"):  # overflows give inf/NaN, as in Keras; the processor checks
            if len(set(map(id, slots))) == n:
                out[:] = self._wave(slots, arr)
            else:
                for idx in _sub_waves(slots):
                    out[idx] = self._wave([slots[i] for i in idx], arr[idx])
        return out

    def _stack(self, slots: Sequence[StateSlot]) -> list[Array]:
        """The slots' states as one (N, size) float32 matrix per state variable."""
        tensors = [s.tensors for s in slots]
        k = len(self._sizes)
        n = len(slots)
        if None in tensors:
            zero = self._zero
            tensors = [zero if t is None else t for t in tensors]
        if any(len(t) != k for t in tensors):  # type: ignore[arg-type]  # no None left
            self._explain(tensors)
        mats = []
        for j, shape in enumerate(self.model.state_shapes):
            try:
                # np.array refuses rows of different shapes; the shape check below
                # catches rows that all have the same wrong shape.
                mat = np.array([t[j] for t in tensors], dtype=np.float32)  # type: ignore[index]
            except (ValueError, IndexError):
                self._explain(tensors)
            if mat.shape != (n, *shape):
                self._explain(tensors)
            mats.append(mat.reshape(n, -1))
        return mats

    def _explain(self, tensors: list[StateTensors | None]) -> NoReturn:
        for t in tensors:
            if t is not None:
                check_state(self.model, t)  # raises, naming the problem
        raise ValueError("inconsistent state tensors")

    def _wave(self, slots: Sequence[StateSlot], x: Array) -> Array:
        """Advance distinct slots by one step each; their (N, output_width) outputs."""
        states_in = self._stack(slots)
        states_out = list(states_in)
        regs: list[Array] = [x] * self.plan.n_registers
        for op in self.plan.ops:
            regs[op.dst] = op.run(regs[op.src], states_in, states_out)
        outs = [regs[r].reshape(len(slots), -1) for r, _ in self.plan.outputs]
        y: Array = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
        # A fresh read-only copy of each row of each state matrix: frombuffer over
        # the row's bytes is the cheapest way there (half the time of copy() and
        # flags.writeable = False), and no slot keeps a whole wave's matrix alive.
        rows = [
            map(np.frombuffer, map(np.ndarray.tobytes, mat.astype(_F32, copy=False)), itertools.repeat(_F32))
            for mat in states_out
        ]
        for slot, tensors in zip(slots, map(list, zip(*rows, strict=True)), strict=True):
            slot.tensors = tensors
        self.steps += len(slots)
        self.waves += 1
        return y


def _sub_waves(slots: Sequence[StateSlot]) -> list[list[int]]:
    """Indices of the first occurrence of every slot, then of the second, ..."""
    waves: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, slot in enumerate(slots):
        k = seen.get(id(slot), 0)
        seen[id(slot)] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(i)
    return waves
