"""A causal Conv1D served one step at a time: its window over a per-sequence buffer.

A causal Conv1D with kernel size K and dilation d computes the output at step t
from the inputs at t - (K - 1) d, ..., t - d, t (zeros before the sequence's
start). Its past (K - 1) d inputs are a state of the sequence, (pad, channels)
oldest first, like a recurrent layer's (see `daemon.inference.layer_calls.conv_buffer`,
which the batch-1 Keras copy holds the same way): one step concatenates the
buffer with the new input into the window, applies the kernel to every d-th row
of the window (one matrix product over the wave), and keeps the window's newest
`pad` rows as the new buffer. A reset state (zeros) is the causal zero padding.
"""

from __future__ import annotations

import numpy as np

from daemon.inference.engines.fast.kernels import Op, Product, Rows, Scratch
from daemon.inference.engines.fast.types import Activation, Array


class CausalConvOp(Op):
    """registers[dst] = act(window[::dilation] @ kernel + bias); the window is the
    state `state` (N, pad * channels) followed by the input (N, channels)."""

    def __init__(
        self,
        src: int,
        dst: int,
        kernel: Array,
        bias: Array | None,
        act: Activation,
        dilation: int,
        state: int,
        rows: Rows,
    ) -> None:
        super().__init__((src,), dst)
        taps, channels, filters = (int(d) for d in kernel.shape)
        self.taps = taps
        self.channels = channels
        self.dilation = dilation
        self.pad = (taps - 1) * dilation
        self.state = state
        self.kernel = np.ascontiguousarray(kernel.reshape(taps * channels, filters))
        # Row blocks, like every product of the engine: a row's bits never depend on its wave.
        self.product = Product(self.kernel, rows)
        self.bias = bias
        self.act = act
        self.scratch = Scratch((self.pad + 1) * channels, filters)

    def run(self, xs: list[Array], states_in: list[Array], states_out: list[Array]) -> Array:
        (x,) = xs
        n = x.shape[0]
        window, y = self.scratch.take(n)
        held = self.pad * self.channels
        window[:, :held] = states_in[self.state]
        window[:, held:] = x
        if self.dilation == 1:
            taps = window
        else:
            rows = window.reshape(n, self.pad + 1, self.channels)
            taps = rows[:, :: self.dilation].reshape(n, self.taps * self.channels)
        self.product(np.ascontiguousarray(taps), y)
        if self.bias is not None:
            y += self.bias
        # The newest `pad` inputs, oldest first: the engine copies them out per slot.
        states_out[self.state] = window[:, self.channels :]
        return self.act(y)
