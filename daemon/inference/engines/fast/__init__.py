"""The fast engine: explicit-state NumPy steps of many sequences at once.

`FastEngine` reads the weights of the model's layers once, at construction, and
computes one time step of N sequences as a few float32 matrix products: the
slots' states are stacked into (N, units) matrices, every layer is applied to
the whole wave, and the new states are split back into fresh per-slot arrays.
It serves a model whose graph, from the one input, is made of layers with one
input and of merges of branches that all come from that input (a Sequential
chain, or a functional model whose branches split and merge anywhere, nested
models included), each a register of (N, width) values per wave, made of:

* recurrent layers: `LSTM`, `GRU` (`reset_after` True or False), `SimpleRNN`, and
  `RNN` over an `LSTMCell`, `GRUCell`, `SimpleRNNCell` or a stack of them, with
  or without biases, with any activations of `ACTIVATIONS`, returning sequences
  or not (a one-step sequence is the step's output);
* `Dense` (any activation of `ACTIVATIONS`), `Activation`;
* per-feature layers: `Normalization` (adapted, or mean and variance given;
  `invert` either way), `Rescaling`, `LayerNormalization` and
  `BatchNormalization` (moving statistics) on the feature axis only;
* `TimeDistributed` over any of the per-step layers above;
* `Conv1D` with padding="causal", any kernel size and dilation, strides 1,
  groups 1, any activation of `ACTIVATIONS` (a kernel of one step with any
  padding is a `Dense`): its last (kernel_size - 1) * dilation_rate inputs are a
  state of the sequence, as in the Keras copy (fast/conv.py);
* merges: `Add`, `Subtract`, `Multiply`, `Average`, `Maximum`, `Minimum` of
  inputs of one shape, `Concatenate` on the feature axis;
* one `Masking` layer: a recurrent layer that receives its mask keeps every
  state of a masked row and outputs its previous output, its h (zeros with
  `zero_output_for_mask`), as Keras does; the other layers ignore the mask at
  inference, as Keras's do;
* the layers that are the identity at inference: `Dropout`, `SpatialDropout1D`,
  `GaussianNoise`, `GaussianDropout`, `AlphaDropout`, `ActivityRegularization`,
  `Identity`; and `InputLayer`.

Anything else (another layer or operation, a recurrent layer called with an
initial state, a mask from anything but a Masking layer, `return_state`, a
quantized, LoRA or non-float32 layer, an activation that is not one of Keras's
built-ins listed in `ACTIVATIONS`) raises `UnsupportedModel`, whose message
names the layer and its class: `make_engine` (engines/factory.py) then falls
back to the Keras engine.

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
of keras/src/layers/rnn/{lstm,gru,simple_rnn}.py at inference (no dropout; the
LSTM's x @ kernel + h @ recurrent is one product over [x, h], the same terms
added in another order); the
sigmoid is computed as 0.5 * tanh(x / 2) + 0.5 (within 1e-7 of TensorFlow's,
and no overflow for large |x|).

Identical repeats. A prediction recomputed after a crash or a rebalance comes
from the same input and state but usually in another wave; it must be the same
bits. A plain `x @ w` does not give that: OpenBLAS chooses its kernel, and the
order of its additions, by the number of rows, so a row of a 1-row and of an
8-row product differ by up to ~1e-5. Every product therefore goes through
kernels.py `Product`, which cuts the wave into blocks of a fixed number of rows
(8, the last block zero-padded); the element-wise ufuncs and the per-row means
are independent of a row's place already (tests/inference/test_engine_repeats.py checks
both). Whether a BLAS gives a row the same bits at every place of a block is
not promised, so `FastEngine.self_test` checks it at start-up through the whole
plan and falls back to blocks of 4, then of 1 (one matrix-vector product per
row); the block is logged (`fast_engine_rows`). The cost is in
docs/performance.md, "Identical repeats: the cost".
"""

from daemon.inference.engines.fast.activations import ACTIVATIONS, numpy_activation
from daemon.inference.engines.fast.blas import limit_blas_threads
from daemon.inference.engines.fast.compiler import Plan, compile_model
from daemon.inference.engines.fast.engine import FastEngine
from daemon.inference.engines.fast.types import UnsupportedModel

__all__ = [
    "ACTIVATIONS",
    "FastEngine",
    "Plan",
    "UnsupportedModel",
    "compile_model",
    "limit_blas_threads",
    "numpy_activation",
]
