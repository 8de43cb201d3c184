"""The port through which the processor steps sequences: what an engine is.

Defined in the core, implemented in `daemon.inference.engines`: the processor
depends on this protocol only, never on TensorFlow or on a particular engine.

State tensors are one float32 array per state variable of every recurrent layer,
in the model's state order, without the batch dimension. Engines never mutate a
state array or list in place: they always leave fresh ones, so anyone may keep
a reference to an old list as a checkpoint. The arrays engines produce are
read-only to enforce this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from daemon.core.state import StateTensors


class StateSlot(Protocol):
    """Where an engine finds and leaves one sequence's state (a `SequenceState`)."""

    tensors: StateTensors | None
    """None means a fresh (zero) state."""


class Engine(Protocol):
    """Advances sequences by one step each; see `step`."""

    name: str

    def step(self, slots: Sequence[StateSlot], xs: np.ndarray) -> np.ndarray:
        """Advance `slots[i]` by the input `xs[i]`, for every i in order.

        `xs` is float32 (N, F). A slot may appear several times and is then
        advanced in list order. Returns the (N, output_width) float32 outputs and
        leaves each slot's updated state in `slot.tensors` (fresh arrays; arrays
        are never mutated in place).
        """
        ...
