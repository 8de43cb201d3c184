"""The engine contract: what every engine is checked against.

The protocol itself (`Engine`, `StateSlot`) is the core's port
(daemon/core/engine.py); this module holds the checks every engine applies to
its inputs and the start-up parity guard that holds a candidate engine to the
reference one, with the project's one tolerance (daemon/inference/tolerance.py).

`KerasEngine` (keras.py) is the reference engine: it runs the model's batch-1
stateful Keras copy one event at a time. `FastEngine` (fast/) steps a whole wave
of sequences at once with NumPy. `make_engine` (factory.py) chooses between
them by name, the only module that knows both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from daemon.core.engine import Engine, StateSlot
from daemon.core.state import StateTensors
from daemon.inference.selfcheck import mask_value
from daemon.inference.servable import ServableModel
from daemon.inference.tolerance import describe_difference

__all__ = [
    "Engine",
    "StateSlot",
    "StateTensors",
    "check_batch",
    "check_state",
    "parity_guard",
    "zero_state_for",
]


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
    events; for a model with a Masking layer, about a quarter of them masked.
    Every output and, at the end, every state must agree to
    ATOL + RTOL * |reference| (daemon/inference/tolerance.py). Otherwise returns what differed.
    """
    rng = np.random.default_rng(seed)
    masked = mask_value(model)
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
        if masked is not None:
            xs[rng.random(len(picks)) < 0.25] = masked
        try:
            got = candidate.step([ours[k] for k in picks], xs)
        except Exception as exc:
            return f"the {candidate.name} engine failed on the parity check: {type(exc).__name__}: {exc}"
        want = reference.step([theirs[k] for k in picks], xs)
        problem = describe_difference(got, want, f"output of event {events + 1}-{events + len(picks)}")
        if problem:
            return f"the {candidate.name} engine differs from the {reference.name} engine: {problem}"
        events += len(picks)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if (a.tensors is None) != (b.tensors is None):
            return f"the {candidate.name} engine left sequence {k} with a different state"
        if a.tensors is not None and b.tensors is not None:
            for j, (x, y) in enumerate(zip(a.tensors, b.tensors, strict=True)):
                problem = describe_difference(
                    np.asarray(x), np.asarray(y), f"state tensor {j} of sequence {k}"
                )
                if problem:
                    return f"the {candidate.name} engine differs from the {reference.name} engine: {problem}"
    return None
