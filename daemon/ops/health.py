"""What the probes report: live while the poll loop beats, ready once serving."""

from __future__ import annotations

import time
from collections.abc import Set
from typing import Protocol


class PartitionView(Protocol):
    """The run loop's partition lifecycle, as the probes read it (from another thread)."""

    def owned(self) -> Set[int]: ...
    def not_serving(self) -> Set[int]: ...
    def rebuilding(self) -> Set[int]: ...


class _Unassigned:
    def owned(self) -> Set[int]:
        return frozenset()

    def not_serving(self) -> Set[int]:
        return frozenset()

    def rebuilding(self) -> Set[int]:
        return frozenset()


class Health:
    """What the probes report. The run loop beats and says why it is not ready yet;
    readiness reads the partitions from the lifecycle itself (`watch`), so there is
    one source of truth for which partitions are owned and restoring."""

    def __init__(self, liveness_timeout_s: float) -> None:
        # A poll loop silent for longer than this is stuck: the process should restart.
        self.liveness_timeout_s = liveness_timeout_s
        self.last_loop = time.monotonic()
        self.model_loaded = False
        self.partitions: PartitionView = _Unassigned()
        self.reason = "starting"
        # Why assigned partitions cannot be served now (a dependency away: the Schema
        # Registry), or None.
        self.blocked: str | None = None

    def watch(self, partitions: PartitionView) -> None:
        self.partitions = partitions

    def beat(self) -> None:
        self.last_loop = time.monotonic()

    def live(self) -> tuple[bool, str]:
        silent = time.monotonic() - self.last_loop
        if silent > self.liveness_timeout_s:
            return False, f"poll loop silent for {silent:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self.model_loaded:
            return False, "model not loaded"
        if not self.partitions.owned():
            return False, f"no partitions assigned ({self.reason})"
        if self.blocked is not None:
            return False, self.blocked
        rebuilding = self.partitions.rebuilding()
        if rebuilding:  # after a model change: replaying their open sequences' inputs
            return False, f"rebuilding partitions {sorted(rebuilding)} for the new model"
        waiting = self.partitions.not_serving()
        if waiting:  # assigned or restoring
            return False, f"restoring partitions {sorted(waiting)}"
        return True, "ok"
