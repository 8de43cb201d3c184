"""Inference engines: advance many sequences by one time step each.

An engine computes, for a batch of events, each event's output and the updated
recurrent state of its sequence. The state of a sequence lives outside the engine,
in a `StateSlot` (a `SequenceState` of daemon/state.py): the engine reads
`slot.tensors` before the step and leaves the new state there after it.

State tensors are one float32 array per state variable of every recurrent layer,
in `ServableModel.state_shapes` order, without the batch dimension. Engines never
mutate a state array or list in place: they always leave fresh ones, so anyone
may keep a reference to an old list as a checkpoint. The arrays engines produce
are read-only to enforce this.

`KerasEngine` is the reference engine: it runs the model's batch-1 stateful Keras
copy one event at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from daemon.model import ServableModel

StateTensors = list[np.ndarray]
"""One float32 array per state variable, batch dimension dropped."""


class StateSlot(Protocol):
    """Where an engine finds and leaves one sequence's state (a SequenceState in
    daemon/state.py)."""

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

    def zero_state(self) -> StateTensors:
        """A fresh state: zeros of every state variable."""
        ...


def zero_state_for(model: ServableModel) -> StateTensors:
    """Read-only float32 zeros of each of the model's state shapes."""
    out = []
    for shape in model.state_shapes:
        arr = np.zeros(shape, dtype=np.float32)
        arr.flags.writeable = False
        out.append(arr)
    return out


def check_batch(model: ServableModel, slots: Sequence[StateSlot], xs: np.ndarray) -> np.ndarray:
    """`xs` as a C-contiguous float32 (N, F) array matching `slots`, or ValueError."""
    arr = np.ascontiguousarray(xs, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != model.n_features:
        raise ValueError(f"xs must have shape (N, {model.n_features}), got {arr.shape}")
    if arr.shape[0] != len(slots):
        raise ValueError(f"{len(slots)} slots for {arr.shape[0]} inputs")
    return arr


def check_state(model: ServableModel, tensors: StateTensors) -> None:
    """ValueError unless `tensors` has one array of the right shape per state variable."""
    if len(tensors) != len(model.state_shapes):
        raise ValueError(f"a state has {len(tensors)} tensors, the model has {len(model.state_shapes)}")
    for i, (arr, shape) in enumerate(zip(tensors, model.state_shapes, strict=True)):
        if tuple(np.shape(arr)) != shape:
            raise ValueError(f"state tensor {i} has shape {tuple(np.shape(arr))}, expected {shape}")


class KerasEngine:
    """The reference engine: one `predict_on_batch` per event on the model's
    batch-1 stateful copy.

    Before an event, the slot's state is assigned into the state variables of the
    stateful copy, unless that slot is already resident: it is the slot the engine
    stepped last and its `tensors` is still the very list the engine left there
    (a sequence continuing). After the event the variables are read back into a
    new list in `slot.tensors`.

    The engine owns `model.stateful`: use one KerasEngine per ServableModel, and
    call `invalidate()` if anything else runs or resets the stateful copy.
    If a step raises, the slots before the failing event have been advanced and
    the others are untouched.
    """

    name = "keras"

    def __init__(self, model: ServableModel) -> None:
        self.model = model
        self._variables = list(model.state_variables)
        self._batch_shapes = [(1, *shape) for shape in model.state_shapes]
        self._zeros = [np.zeros(shape, dtype=np.float32) for shape in self._batch_shapes]
        self._resident_slot: StateSlot | None = None
        self._resident_tensors: StateTensors | None = None
        #: Events stepped, and how many of them needed their state assigned.
        self.steps = 0
        self.swaps = 0
        self.invalidate()

    def zero_state(self) -> StateTensors:
        return zero_state_for(self.model)

    def invalidate(self) -> None:
        """Forget which slot is resident: the next event assigns its state."""
        self._resident_slot = None
        self._resident_tensors = None

    def step(self, slots: Sequence[StateSlot], xs: np.ndarray) -> np.ndarray:
        arr = check_batch(self.model, slots, xs)
        n, n_features = arr.shape
        out = np.empty((n, self.model.output_width), dtype=np.float32)
        stateful = self.model.stateful
        for i, slot in enumerate(slots):
            tensors = slot.tensors
            resident = slot is self._resident_slot and tensors is self._resident_tensors
            # Forget residency before touching the variables: if anything below
            # raises, what they hold is unknown and the next event must assign.
            self.invalidate()
            if not resident:
                self._assign(tensors)
            raw = stateful.predict_on_batch(arr[i].reshape(1, 1, n_features))
            out[i] = self.model.flatten_step_outputs(raw)
            new = self._read()
            slot.tensors = new
            self._resident_slot = slot
            self._resident_tensors = new
            self.steps += 1
        return out

    def _assign(self, tensors: StateTensors | None) -> None:
        self.swaps += 1
        if tensors is None:
            for var, zeros in zip(self._variables, self._zeros, strict=True):
                var.assign(zeros)
            return
        check_state(self.model, tensors)
        for var, arr, shape in zip(self._variables, tensors, self._batch_shapes, strict=True):
            var.assign(np.asarray(arr, dtype=np.float32).reshape(shape))

    def _read(self) -> StateTensors:
        new = []
        for var in self._variables:
            arr = np.array(var.numpy()[0], dtype=np.float32)  # an owned copy
            arr.flags.writeable = False
            new.append(arr)
        return new
