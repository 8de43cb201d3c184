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
copy one event at a time. `FastEngine` (daemon/fast.py) steps a whole wave of
sequences at once with NumPy. `make_engine` chooses between them by name and
falls back to KerasEngine, with a reason, when the fast engine cannot serve a
model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


# --------------------------------------------------------------------------- choosing an engine

#: The engine names `make_engine` knows (the values of LSTMD_ENGINE).
ENGINES = ("keras", "fast")
#: Tolerances of the fast engine's start-up parity guard (those of the model's self-check).
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-5


@dataclass(eq=False)
class _GuardSlot:
    tensors: StateTensors | None = None


def parity_guard(
    candidate: Engine,
    reference: Engine,
    model: ServableModel,
    *,
    seed: int = 0,
    sequences: int = 4,
    calls: int = 10,
) -> str | None:
    """Run both engines over the same seeded random events; None if they agree.

    `sequences` interleaved sequences are stepped in `calls` calls of 1 to 6
    events each (a sequence may appear several times in one call), with random
    resets and one sequence restarted from a copy of another's state: ~35
    events. Every output and, at the end, every state must agree to
    PARITY_ATOL + PARITY_RTOL * |reference|. Otherwise returns what differed.
    """
    rng = np.random.default_rng(seed)
    ours = [_GuardSlot() for _ in range(sequences)]
    theirs = [_GuardSlot() for _ in range(sequences)]
    events = 0
    for call in range(calls):
        picks = [int(k) for k in rng.integers(0, sequences, size=int(rng.integers(1, 7)))]
        for k in set(picks):
            if rng.random() < 0.1:
                ours[k].tensors = theirs[k].tensors = None
        if call == calls // 2 and theirs[0].tensors is not None:
            # A state that did not come from the candidate engine itself.
            ours[1].tensors = [np.array(a) for a in theirs[0].tensors]
            theirs[1].tensors = [np.array(a) for a in theirs[0].tensors]
        xs = rng.standard_normal((len(picks), model.n_features)).astype(np.float32)
        try:
            got = candidate.step([ours[k] for k in picks], xs)
        except Exception as exc:
            return f"the {candidate.name} engine failed on the parity check: {type(exc).__name__}: {exc}"
        want = reference.step([theirs[k] for k in picks], xs)
        problem = _compare(got, want, f"output of event {events + 1}-{events + len(picks)}")
        if problem:
            return f"the {candidate.name} engine differs from the {reference.name} engine: {problem}"
        events += len(picks)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if (a.tensors is None) != (b.tensors is None):
            return f"the {candidate.name} engine left sequence {k} with a different state"
        if a.tensors is not None and b.tensors is not None:
            for j, (x, y) in enumerate(zip(a.tensors, b.tensors, strict=True)):
                problem = _compare(np.asarray(x), np.asarray(y), f"state tensor {j} of sequence {k}")
                if problem:
                    return f"the {candidate.name} engine differs from the {reference.name} engine: {problem}"
    return None


def _compare(got: np.ndarray, want: np.ndarray, what: str) -> str | None:
    if got.shape != want.shape:
        return f"{what} has shape {got.shape}, expected {want.shape}"
    if np.allclose(got, want, rtol=PARITY_RTOL, atol=PARITY_ATOL, equal_nan=True):
        return None
    with np.errstate(invalid="ignore"):
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if np.isnan(err).any():
        return f"{what} is not finite where the other is"
    return (
        f"{what} differs by up to {float(np.nanmax(err)):.3g} "
        f"(tolerance {PARITY_ATOL:g} + {PARITY_RTOL:g} x |value|)"
    )


def make_engine(name: str, model: ServableModel) -> tuple[Engine, str | None]:
    """The engine called `name` for `model`, and why another was chosen (or None).

    "keras": KerasEngine. "fast": FastEngine (daemon/fast.py) when it supports
    every layer of the model and passes `parity_guard` against KerasEngine;
    otherwise KerasEngine and a readable reason (the caller logs it).
    """
    if name == "keras":
        return KerasEngine(model), None
    if name != "fast":
        raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
    from daemon.fast import FastEngine, UnsupportedModel  # imports this module

    try:
        fast = FastEngine(model)
    except UnsupportedModel as exc:
        return KerasEngine(model), str(exc)
    mismatch = parity_guard(fast, KerasEngine(model), model)
    if mismatch is not None:
        return KerasEngine(model), f"start-up parity check failed: {mismatch}"
    return fast, None
