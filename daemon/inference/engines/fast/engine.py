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
from daemon.inference.servable import ServableModel
from daemon.ops.logs import get_logger

_F32 = np.dtype(np.float32)
log = get_logger(__name__)

#: The self-test's waves: (other rows before, other rows after) the tested
#: rows; waves of 13 to 77 rows, the tested rows at offsets that are and are
#: not multiples of every candidate block.
_PLACES = ((0, 0), (1, 0), (3, 2), (5, 46), (7, 0), (8, 1), (13, 51))
#: How many rows the self-test checks, each one alone and in every wave above.
_TEST_ROWS = 13


class FastEngine:
    """Steps a whole wave of sequences at once with NumPy (see the module docstring).

    `step` splits its slots into sub-waves so that a slot appearing several times
    is advanced in list order (the k-th occurrences of every slot form sub-wave
    k). The new state of each slot is one owned read-only float32 buffer per
    slot, the state tensors being views of it: a sequence never keeps another
    sequence's memory alive. If a step raises, the slots of the sub-waves before
    the failing one have been advanced and the others are untouched.

    Identical repeats: each row of a wave (a slot's output and new state)
    depends on that row's input and state alone, bit for bit, whatever the wave
    (kernels.py `Rows`); `self_test` checks it at construction and picks the
    row blocks (`rows.block`, logged) that give it on this machine.
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
        #: Whether the self-test found rows identical in every wave (False: no
        #: candidate block gave it, the last and strictest one is kept).
        self.identical_rows = self.self_test()

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

    def self_test(self, seed: int = 0) -> bool:
        """Pick the fastest row blocks whose rows are identical in any wave.

        For each candidate of `Rows.CANDIDATES` (fastest first), `_TEST_ROWS`
        random rows (input and states, from `seed`) are computed alone, then
        among other random rows at each place of `_PLACES` (waves of 13 to 77
        rows, offsets 0 to 13), with the model's own weights and the whole
        plan (products, activations, reductions, merges): the first candidate
        whose outputs and new states are the same bytes everywhere is kept. That
        a BLAS gives a row the same bits at any place of a block is likely (it
        held on the machine this was written on) but not promised, hence a test
        on the machine that serves, not an assumption. Returns False, keeping
        the last (strictest) candidate and logging a warning, when none passes:
        repeats are then still correct to the engine's tolerance, not identical.
        Costs a few milliseconds, once."""
        rng = np.random.default_rng(seed)
        width = max(self.model.n_features, 1)
        n_max = _TEST_ROWS + max(a + b for a, b in _PLACES)
        x = rng.standard_normal((n_max, width), dtype=np.float32)
        states = [rng.standard_normal((n_max, size), dtype=np.float32) for size in self._sizes]
        rows = self.plan.rows
        with np.errstate(all="ignore"):
            for block in rows.CANDIDATES:
                rows.block = block
                if self.rows_identical(x, states):
                    log.info("fast_engine_rows", block=block, identical=True)
                    return True
        log.warning(
            "fast_engine_rows",
            block=rows.block,
            identical=False,
            detail="a row's bits depend on its wave here: a repeated prediction is equal within "
            "tolerance, not identical",
        )
        return False

    def rows_identical(self, x: Array, states: list[Array]) -> bool:
        """The self-test of the current row block (public: a test stands in for a machine
        where it fails). Whether the first `_TEST_ROWS` rows of x and states give the same bytes
        alone and at every place of `_PLACES` (the other rows of a wave are the
        rows after them in x)."""
        alone_y, alone_states = [], []
        for i in range(_TEST_ROWS):
            y, new = self._compute(x[i : i + 1], [s[i : i + 1] for s in states])
            alone_y.append(y.copy())  # the results live in scratch buffers the next wave reuses
            alone_states.append([s.copy() for s in new])
        ref_y = np.concatenate(alone_y)
        ref_states = [np.concatenate([st[j] for st in alone_states]) for j in range(len(states))]
        for before, after in _PLACES:
            # The tested rows after `before` other rows, followed by `after` more.
            order = np.r_[
                _TEST_ROWS : _TEST_ROWS + before,
                0:_TEST_ROWS,
                _TEST_ROWS + before : _TEST_ROWS + before + after,
            ]
            y, new = self._compute(x[order], [s[order] for s in states])
            part = slice(before, before + _TEST_ROWS)
            if y[part].tobytes() != ref_y.tobytes():
                return False
            if any(n[part].tobytes() != r.tobytes() for n, r in zip(new, ref_states, strict=True)):
                return False
        return True

    def _compute(self, x: Array, states_in: list[Array]) -> tuple[Array, list[Array]]:
        """The plan over a wave: its (N, output_width) outputs and new (N, size)
        state matrices (both possibly in the ops' scratch buffers: valid until
        the next wave)."""
        states_out = list(states_in)
        regs: list[Array] = [x] * self.plan.n_registers
        for op in self.plan.ops:
            regs[op.dst] = op.run([regs[r] for r in op.srcs], states_in, states_out)
        n = x.shape[0]
        outs = [regs[r].reshape(n, -1) for r, _ in self.plan.outputs]
        y: Array = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)
        return y, states_out

    def _wave(self, slots: Sequence[StateSlot], x: Array) -> Array:
        """Advance distinct slots by one step each; their (N, output_width) outputs."""
        y, states_out = self._compute(x, self._stack(slots))
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
