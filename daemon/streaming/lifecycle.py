"""The partition lifecycle: assigned -> restoring [-> rebuilding] -> active -> released.

Assigned: its committed input position is read first, and only once it is stable
(a read_committed consumer waits out a transaction still pending on it) does the
restore read the state partition, so no committed transaction's states are missed.

One record of every owned input partition's phase and of how far it was read,
kept by the run loop and read by the probes (`/readyz` is 503 while any
partition restores). A partition's records are processed only when it is
active; while it restores, the loop hands its polled records back.

The probes read from the HTTP thread: each change publishes a fresh immutable
view, so a reader never sees a dict being changed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Phase(enum.Enum):
    ASSIGNED = "assigned"  # waiting for its committed position to be stable
    RESTORING = "restoring"  # its states are being read back from the state topic
    REBUILDING = "rebuilding"  # its sequences saved under another model are being replayed
    ACTIVE = "active"  # its inputs are processed


class Partitions:
    def __init__(self) -> None:
        self._phase: dict[int, Phase] = {}
        self._position: dict[int, int] = {}  # next offset to process, once one was
        self._view: tuple[frozenset[int], frozenset[int], frozenset[int]] = (
            frozenset(),
            frozenset(),
            frozenset(),
        )

    # -- transitions ----------------------------------------------------------------
    def assign(self, partitions: Iterable[int]) -> None:
        """Assigned (or rewound after an abort): its position, then a restore, first."""
        for p in partitions:
            self._phase[p] = Phase.ASSIGNED
            self._position.pop(p, None)
        self._publish()

    def begin_restore(self, partition: int) -> None:
        if self._phase.get(partition) is Phase.ASSIGNED:
            self._phase[partition] = Phase.RESTORING
            self._publish()

    def restored(self, partition: int) -> None:
        if self._phase.get(partition) is Phase.RESTORING:
            self._phase[partition] = Phase.ACTIVE
            self._publish()

    def begin_rebuild(self, partition: int) -> None:
        """Restored, with sequences of another model to replay before it serves."""
        if self._phase.get(partition) is Phase.RESTORING:
            self._phase[partition] = Phase.REBUILDING
            self._publish()

    def rebuilt(self, partition: int) -> None:
        """Its rebuilt states are checkpointed: it serves. A partition released or
        rewound (an abort) meanwhile is left where it is."""
        if self._phase.get(partition) is Phase.REBUILDING:
            self._phase[partition] = Phase.ACTIVE
            self._publish()

    def release(self, partition: int) -> None:
        """Revoked or lost: nothing of it is kept."""
        self._phase.pop(partition, None)
        self._position.pop(partition, None)
        self._publish()

    def advance(self, partition: int, offset: int) -> None:
        """The next offset to process in `partition` (for the lag)."""
        self._position[partition] = offset

    # -- reading ----------------------------------------------------------------------
    def phase(self, partition: int) -> Phase | None:
        return self._phase.get(partition)

    def serving(self, partition: int) -> bool:
        """Its records may be processed (owned and restored)."""
        return self._phase.get(partition) is Phase.ACTIVE

    def in_phase(self, phase: Phase) -> list[int]:
        return sorted(p for p, ph in self._phase.items() if ph is phase)

    def position(self, partition: int) -> int | None:
        return self._position.get(partition)

    def owned(self) -> frozenset[int]:
        return self._view[0]

    def not_serving(self) -> frozenset[int]:
        """Owned but not serving yet (assigned, restoring or rebuilding)."""
        return self._view[1]

    def rebuilding(self) -> frozenset[int]:
        """Replaying inputs through a new model before serving (a subset of `restoring`)."""
        return self._view[2]

    def _publish(self) -> None:
        self._view = (
            frozenset(self._phase),
            frozenset(p for p, phase in self._phase.items() if phase is not Phase.ACTIVE),
            frozenset(p for p, phase in self._phase.items() if phase is Phase.REBUILDING),
        )
