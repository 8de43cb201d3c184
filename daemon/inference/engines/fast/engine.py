"""`FastEngine`: a whole wave of sequences per NumPy step, states stacked and split."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from daemon.core.engine import StateSlot
from daemon.core.state import StateTensors
from daemon.inference.engines.contract import check_batch, check_state, zero_state_for
from daemon.inference.engines.fast.blas import limit_blas_threads
from daemon.inference.engines.fast.compiler import compile_model
from daemon.inference.engines.fast.types import Array
from daemon.inference.model import ServableModel

_F32 = np.dtype(np.float32)


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
            regs[op.dst] = op.run([regs[r] for r in op.srcs], states_in, states_out)
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
