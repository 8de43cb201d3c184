"""Layer calls replaced in the batch-1 stateful copy, so that one step equals the whole sequence's.

Two kinds of layer compute a step from more than the step and their Keras states:
a causal Conv1D reads its last inputs (kept here in a buffer variable, see
`buffer_causal_conv`), and an RNN behind a `Masking` layer outputs its previous
output on a masked step (which a one-step call does not have, see
`carry_masked_output`). `stateful.stateful_copy` patches the copy's layers with
these calls; the engines read the buffers through `conv_buffer` and `layer_states`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

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


def buffer_causal_conv(layer: Any) -> None:
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


def carry_masked_output(layer: keras.layers.RNN) -> None:
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
