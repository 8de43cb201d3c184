"""Per-sequence recurrent state, one per (input partition, sequence id).

Knows nothing of Kafka or TensorFlow: a state is NumPy arrays plus the
bookkeeping that makes redelivery harmless (the watermark).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

StateTensors = list[np.ndarray]

# Offsets start at 0; -1 means "nothing applied yet".
NO_OFFSET = -1


@dataclass(slots=True, eq=False)
class SequenceState:
    """One sequence's recurrent state and where in the input it stands.

    `tensors` is None for a fresh or reset state (zeros): the engine fills it.
    `watermark` is the offset of the last input this state includes; an input
    at or below it is never applied again. `first_offset` is the offset of the
    sequence's first input since its last reset, so an open sequence can be
    rebuilt by replaying from there. `last_step` is the `step` of the last input
    planned for it; the processor keeps it, so `reset` leaves it alone.
    """

    tensors: StateTensors | None = None
    n: int = 0
    watermark: int = NO_OFFSET
    first_offset: int = NO_OFFSET
    last_step: int | None = None

    def reset(self) -> None:
        self.tensors = None
        self.n = 0
        self.first_offset = NO_OFFSET


class StateStore:
    """All sequence states of the partitions this process owns.

    A partition's high watermark (the last offset processed in it) is kept even
    for sequences that ended and were dropped, so a record redelivered after a
    seek or retry cannot start a sequence over.
    """

    def __init__(self) -> None:
        self._states: dict[int, dict[str, SequenceState]] = {}
        self._high: dict[int, int] = {}

    def get(self, partition: int, key: str) -> SequenceState:
        states = self._states.setdefault(partition, {})
        state = states.get(key)
        if state is None:
            state = states[key] = SequenceState()
        return state

    def discard(self, partition: int, key: str) -> None:
        """Forget a sequence that ended: a fresh state is all zeros anyway."""
        self._states.get(partition, {}).pop(key, None)

    def high_watermark(self, partition: int) -> int:
        return self._high.get(partition, NO_OFFSET)

    def advance(self, partition: int, offset: int) -> None:
        if offset > self._high.get(partition, NO_OFFSET):
            self._high[partition] = offset

    def drop_partition(self, partition: int) -> int:
        """Forget a partition this process no longer owns; returns how many states went."""
        self._high.pop(partition, None)
        return len(self._states.pop(partition, {}))

    def partitions(self) -> list[int]:
        return sorted(set(self._states) | set(self._high))

    def __len__(self) -> int:
        return sum(len(s) for s in self._states.values())

    def __iter__(self) -> Iterator[tuple[int, str, SequenceState]]:
        for partition, states in self._states.items():
            for key, state in states.items():
                yield partition, key, state
