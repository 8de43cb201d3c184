"""The reference engine: `predict_on_batch` on the model's batch-1 stateful copy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from daemon.core.engine import StateSlot
from daemon.core.state import StateTensors
from daemon.inference.engines.contract import check_batch, check_state
from daemon.inference.servable import ServableModel


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
