"""The fast engine's kernels: recurrent cells and per-step layer operations in NumPy.

The formulas are term for term those of Keras's layers at inference (see the
package docstring); every kernel computes a whole wave, (N, width) in and out.

Every matrix product goes through a `Product`, so that each row's result
depends on that row alone, bit for bit, whatever the wave's size and the row's
place in it (see `Rows`): a prediction recomputed after a crash or a rebalance,
in another wave, is then identical to the first.
"""

from __future__ import annotations

from typing import Any, ClassVar

import keras
import numpy as np

from daemon.inference.engines.fast.activations import ACTIVATIONS, numpy_activation
from daemon.inference.engines.fast.types import Activation, Array, UnsupportedModel


def weights(var: Any, what: str) -> Array:
    arr = np.asarray(keras.ops.convert_to_numpy(var))
    if arr.dtype != np.float32:
        raise UnsupportedModel(f"{what} has {arr.dtype} weights; the fast engine computes in float32")
    return np.ascontiguousarray(arr)


def describe(layer: Any) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


class Scratch:
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


class Rows:
    """How a plan's products cut a wave into rows: blocks of `block` rows.

    OpenBLAS picks its kernel, and with it the order of the additions, by the
    shape of the product: a row of `x[:1] @ w` and the same row of `x[:8] @ w`
    differ in the last bits (up to ~1e-5 measured), and so would a repeated
    prediction computed in another wave. Cut into blocks of one fixed number of
    rows, the last one zero-padded, every row goes through products of one
    shape, at one of `block` places in a block. Whether that place can change
    a row's bits depends on the BLAS build and the processor (blocks of 4 and 8
    gave identical rows on the machine this was written on, 16 and 32 did
    not), so the engine checks it at start-up on the model's own weights
    (engine.py `self_test`) and falls back to `block = 1`: one product per row
    (a matrix-vector product, what a wave of one computes), the strictest.
    Shared by every product of a plan, so that the engine switches them all."""

    #: The candidates, fastest first (blocks of 8 measured ~1.5x one plain
    #: product at 1000 rows, single rows ~2-2.5x; see docs/performance.md).
    CANDIDATES = (8, 4, 1)

    def __init__(self, block: int = CANDIDATES[0]) -> None:
        self.block = block


class Product:
    """out = x @ w, cut into `rows.block`-row blocks, each one BLAS product.

    The full blocks are one `np.matmul` over an (N // block, block, k) view:
    NumPy loops over the blocks in C, calling one BLAS product per block, so
    the Python cost per call stays constant whatever the wave. The last, short
    block is copied into a zero-padded block of its own."""

    def __init__(self, w: Array, rows: Rows) -> None:
        self.w = np.ascontiguousarray(w)
        self.rows = rows
        k, m = self.w.shape
        self.tail_in = np.zeros((0, k), dtype=np.float32)
        self.tail_out = np.zeros((0, m), dtype=np.float32)

    def __call__(self, x: Array, out: Array) -> Array:
        """x @ w into `out`, a C-contiguous (N, m) float32 array; returns `out`."""
        b = self.rows.block
        n, k = x.shape
        m = self.w.shape[1]
        if not out.flags.c_contiguous:
            raise ValueError("a Product writes into a C-contiguous array")
        full = n - n % b
        if full:
            # Splitting the first axis is always a view, of x and of out.
            np.matmul(x[:full].reshape(-1, b, k), self.w, out=out[:full].reshape(-1, b, m))
        if full < n:
            if self.tail_in.shape[0] != b:
                self.tail_in = np.zeros((b, k), dtype=np.float32)
                self.tail_out = np.empty((b, m), dtype=np.float32)
            rest = n - full
            self.tail_in[:rest] = x[full:]
            self.tail_in[rest:] = np.float32(0.0)
            np.matmul(self.tail_in, self.w, out=self.tail_out)
            out[full:] = self.tail_out[:rest]
        return out


class Cell:
    """One recurrent cell: (x, its states) -> (output, its new states)."""

    n_states = 1

    def __call__(self, x: Array, states: list[Array]) -> tuple[Array, list[Array]]:
        raise NotImplementedError


class LSTMKernel(Cell):
    n_states = 2

    def __init__(self, cell: Any, what: str, rows: Rows) -> None:
        u = self.units = int(cell.units)
        self.act = numpy_activation(cell.activation, what)
        self.rec = numpy_activation(cell.recurrent_activation, f"{what} (recurrent)")
        # Columns reordered from Keras's i, f, c, o to i, f, o, c: the three gates
        # under the recurrent activation are then one contiguous block.
        order = np.r_[0 : 2 * u, 3 * u : 4 * u, 2 * u : 3 * u]
        kernel = weights(cell.kernel, what)[:, order]
        recurrent = weights(cell.recurrent_kernel, what)[:, order]
        bias = weights(cell.bias, what)[order] if cell.use_bias else None
        # The usual sigmoid gates and tanh: sigmoid(z) = tanh(z / 2) / 2 + 1/2, so
        # with the gates' weights halved (exact in binary floating point) one
        # tanh over the whole pre-activation serves all four blocks.
        self.fused = self.rec is ACTIVATIONS["sigmoid"] and self.act is ACTIVATIONS["tanh"]
        if self.fused:
            half = np.ones(4 * u, dtype=np.float32)
            half[: 3 * u] = 0.5
            kernel = kernel * half
            recurrent = recurrent * half
            bias = bias * half if bias is not None else None
        self.kernel = np.ascontiguousarray(kernel)
        self.recurrent = np.ascontiguousarray(recurrent)
        self.bias = np.ascontiguousarray(bias) if bias is not None else None
        # One product over [x, h] @ [kernel; recurrent] instead of x @ kernel +
        # h @ recurrent: the same terms, added in another order than Keras's
        # (parity stays ~1e-7), for half the products: ~10% of a step measured,
        # each product costing a padded block or a call per row (see `Rows`).
        self.n_in = int(self.kernel.shape[0])
        self.product = Product(np.concatenate([self.kernel, self.recurrent]), rows)
        self.scratch = Scratch(4 * u, 4 * u, u, u, self.n_in + u)

    def __call__(self, x: Array, states: list[Array]) -> tuple[Array, list[Array]]:
        h, c = states
        u = self.units
        z, t, c_new, h_new, xh = self.scratch.take(x.shape[0])
        xh[:, : self.n_in] = x
        xh[:, self.n_in :] = h
        self.product(xh, z)
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


class GRUKernel(Cell):
    def __init__(self, cell: Any, what: str, rows: Rows) -> None:
        u = self.units = int(cell.units)
        self.reset_after = bool(cell.reset_after)
        self.kernel = weights(cell.kernel, what)
        recurrent = weights(cell.recurrent_kernel, what)
        self.bias_in: Array | None = None
        self.bias_rec: Array | None = None
        if cell.use_bias:
            bias = weights(cell.bias, what)
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
        self.x_product = Product(self.kernel, rows)
        self.h_product = Product(self.recurrent, rows)
        self.rh_product = Product(self.recurrent_h, rows)
        self.scratch = Scratch(3 * u, self.recurrent.shape[1], u, u, u)

    def __call__(self, x: Array, states: list[Array]) -> tuple[Array, list[Array]]:
        (h,) = states
        u = self.units
        mx, mi, a, b, h_new = self.scratch.take(x.shape[0])
        self.x_product(x, mx)
        if self.bias_in is not None:
            mx += self.bias_in
        self.h_product(h, mi)
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
            rh = self.rh_product(np.multiply(r, h, out=a), b)
        hh = mx[:, 2 * u :]
        hh += rh
        hh = self.act(hh)
        # h = z * h + (1 - z) * hh, as Keras's.
        np.multiply(z, h, out=h_new)
        one_minus_z = np.subtract(np.float32(1.0), z, out=a)
        one_minus_z *= hh
        h_new += one_minus_z
        return h_new, [h_new]


class SimpleRNNKernel(Cell):
    def __init__(self, cell: Any, what: str, rows: Rows) -> None:
        self.kernel = weights(cell.kernel, what)
        self.recurrent = weights(cell.recurrent_kernel, what)
        self.bias = weights(cell.bias, what) if cell.bias is not None else None
        self.act = numpy_activation(cell.activation, what)
        u = int(cell.units)
        self.x_product = Product(self.kernel, rows)
        self.h_product = Product(self.recurrent, rows)
        self.scratch = Scratch(u, u)

    def __call__(self, x: Array, states: list[Array]) -> tuple[Array, list[Array]]:
        (h,) = states
        y, t = self.scratch.take(x.shape[0])
        self.x_product(x, y)
        if self.bias is not None:
            y += self.bias
        y += self.h_product(h, t)
        out = self.act(y)
        return out, [out]


class Op:
    """One layer application: registers[dst] = run([registers[s] for s in srcs], ...);
    a recurrent one reads its states from `states_in` and leaves the new ones in
    `states_out` (lists over the model's state variables). The result may live
    in the op's scratch buffers: it is valid until the op runs again, and an op
    never writes into its inputs (another op may read them)."""

    def __init__(self, srcs: tuple[int, ...], dst: int) -> None:
        self.srcs = srcs
        self.dst = dst

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        raise NotImplementedError


class DenseOp(Op):
    def __init__(
        self, src: int, dst: int, kernel: Array, bias: Array | None, act: Activation, rows: Rows
    ) -> None:
        super().__init__((src,), dst)
        self.kernel = kernel
        self.product = Product(kernel, rows)
        self.bias = bias
        self.act = act
        self.scratch = Scratch(int(kernel.shape[1]))

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        (x,) = xs
        (y,) = self.scratch.take(x.shape[0])
        self.product(x, y)
        if self.bias is not None:
            y += self.bias
        return self.act(y)


class ActivationOp(Op):
    def __init__(self, src: int, dst: int, width: int, act: Activation) -> None:
        super().__init__((src,), dst)
        self.act = act
        self.scratch = Scratch(width)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        (y,) = self.scratch.take(xs[0].shape[0])
        np.copyto(y, xs[0])  # activations overwrite their input; x may be read by another op
        return self.act(y)


class AffineOp(Op):
    """y = x * scale + offset, per feature (either may be None: 1 and 0).

    `Rescaling` as Keras computes it; `Normalization` and `BatchNormalization` at
    inference are also per-feature affine maps, but Keras computes them in a
    different order of operations, so they have their own ops (exactness to
    ~1e-7, not just 1e-5)."""

    def __init__(self, src: int, dst: int, width: int, scale: Array | None, offset: Array | None) -> None:
        super().__init__((src,), dst)
        self.scale = scale
        self.offset = offset
        self.scratch = Scratch(width)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        (y,) = self.scratch.take(xs[0].shape[0])
        if self.scale is not None:
            np.multiply(xs[0], self.scale, out=y)
        else:
            np.copyto(y, xs[0])
        if self.offset is not None:
            y += self.offset
        return y


class NormalizationOp(Op):
    """Keras's `Normalization`: (x - mean) / max(sqrt(variance), epsilon), or with
    invert=True mean + x * max(sqrt(variance), epsilon); `denominator` is
    max(sqrt(variance), epsilon), computed once in float32 as Keras computes it
    at every call."""

    def __init__(self, src: int, dst: int, width: int, mean: Array, denominator: Array, invert: bool) -> None:
        super().__init__((src,), dst)
        self.mean = mean
        self.denominator = denominator
        self.invert = invert
        self.scratch = Scratch(width)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        (y,) = self.scratch.take(xs[0].shape[0])
        if self.invert:
            np.multiply(xs[0], self.denominator, out=y)
            y += self.mean
        else:
            np.subtract(xs[0], self.mean, out=y)
            y /= self.denominator
        return y


class BatchNormOp(Op):
    """`BatchNormalization` at inference, as TensorFlow's `tf.nn.batch_normalization`:
    inv = rsqrt(variance + epsilon) * gamma; y = x * inv + (beta - mean * inv)."""

    def __init__(self, src: int, dst: int, width: int, inv: Array, shift: Array) -> None:
        super().__init__((src,), dst)
        self.inv = inv
        self.shift = shift
        self.scratch = Scratch(width)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        (y,) = self.scratch.take(xs[0].shape[0])
        np.multiply(xs[0], self.inv, out=y)
        y += self.shift
        return y


class LayerNormOp(Op):
    """`LayerNormalization` over the feature axis, as keras/src/ops/nn.py computes it:
    mean and (biased) variance of each row, inv = rsqrt(variance + epsilon) * gamma,
    y = x * inv + (beta - mean * inv)."""

    def __init__(
        self, src: int, dst: int, width: int, gamma: Array | None, beta: Array | None, epsilon: float
    ) -> None:
        super().__init__((src,), dst)
        self.gamma = gamma
        self.beta = beta
        self.epsilon = np.float32(epsilon)
        self.scratch = Scratch(width, width)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        x = xs[0]
        y, t = self.scratch.take(x.shape[0])
        mean = x.mean(axis=1, keepdims=True, dtype=np.float32)
        np.subtract(x, mean, out=t)
        np.square(t, out=t)
        var = t.mean(axis=1, keepdims=True, dtype=np.float32)
        var += self.epsilon
        inv = np.sqrt(var, out=var)
        np.divide(np.float32(1.0), inv, out=inv)
        if self.gamma is not None:
            inv = inv * self.gamma  # (N, 1) -> (N, width)
        # y = x * inv + (beta - mean * inv), Keras's order of operations.
        res = -mean * inv
        if self.beta is not None:
            res = res + self.beta
        np.multiply(x, inv, out=y)
        y += res
        return y


class MergeOp(Op):
    """Element-wise merges of equal-width registers (`Add`, `Subtract`,
    `Multiply`, `Average`, `Maximum`, `Minimum`) in Keras's order (left to
    right; `Average` divides the sum by the count), and `Concatenate` on the
    feature axis."""

    _UFUNCS: ClassVar[dict[str, Any]] = {
        "add": np.add,
        "subtract": np.subtract,
        "multiply": np.multiply,
        "average": np.add,
        "maximum": np.maximum,
        "minimum": np.minimum,
    }

    def __init__(self, srcs: tuple[int, ...], dst: int, kind: str, width: int) -> None:
        super().__init__(srcs, dst)
        self.kind = kind
        self.scratch = Scratch(width)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        (y,) = self.scratch.take(xs[0].shape[0])
        if self.kind == "concatenate":
            np.concatenate(xs, axis=1, out=y)
            return y
        ufunc = self._UFUNCS[self.kind]
        ufunc(xs[0], xs[1], out=y)
        for x in xs[2:]:
            ufunc(y, x, out=y)
        if self.kind == "average":
            y /= np.float32(len(xs))
        return y


class MaskOp(Op):
    """`Masking`'s mask: (N, 1) booleans, True where a feature differs from
    mask_value (the step is kept)."""

    def __init__(self, src: int, dst: int, mask_value: float) -> None:
        super().__init__((src,), dst)
        self.mask_value = np.float32(mask_value)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        keep: Array = np.any(xs[0] != self.mask_value, axis=1, keepdims=True)
        return keep


class MaskedValuesOp(Op):
    """`Masking`'s output: x where the step is kept, zeros where it is masked."""

    def __init__(self, src: int, mask: int, dst: int, width: int) -> None:
        super().__init__((src, mask), dst)
        self.scratch = Scratch(width)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        x, keep = xs
        (y,) = self.scratch.take(x.shape[0])
        y.fill(np.float32(0.0))
        np.copyto(y, x, where=keep)
        return y


class RecurrentOp(Op):
    """A recurrent layer's step. With a mask register (a `Masking` upstream), a
    masked row keeps every state of the layer and outputs its previous output,
    which for these cells is the h state of the (last) cell: zeros when
    zero_output_for_mask (Keras's masked RNN semantics, see
    keras/src/backend/tensorflow/rnn.py)."""

    def __init__(
        self,
        src: int,
        dst: int,
        cells: list[Cell],
        state: int,
        mask: int | None = None,
        zero_masked: bool = False,
    ) -> None:
        super().__init__((src,) if mask is None else (src, mask), dst)
        self.cells = cells
        self.state = state  # index of the first state of the first cell
        self.zero_masked = zero_masked

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        x = xs[0]
        k = first = self.state
        last_h = first
        for cell in self.cells:
            n = cell.n_states
            last_h = k
            x, new = cell(x, states_in[k : k + n])
            states_out[k : k + n] = new
            k += n
        if len(xs) == 1:
            return x
        keep = xs[1]
        if keep.all():
            return x
        for j in range(first, k):
            states_out[j] = np.where(keep, states_out[j], states_in[j])
        held = np.float32(0.0) if self.zero_masked else states_in[last_h]
        out: Array = np.where(keep, x, held)
        return out
