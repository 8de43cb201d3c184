"""What the probes report: live while the poll loop beats, ready once serving."""

from __future__ import annotations

import time


class Health:
    """What the probes report, updated by the run loop."""

    def __init__(self, liveness_timeout_s: float) -> None:
        # A poll loop silent for longer than this is stuck: the process should restart.
        self.liveness_timeout_s = liveness_timeout_s
        self.last_loop = time.monotonic()
        self.model_loaded = False
        self.assigned = False
        self.restoring: set[int] = set()
        self.reason = "starting"

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
        if not self.assigned:
            return False, f"no partitions assigned ({self.reason})"
        if self.restoring:
            return False, f"restoring partitions {sorted(self.restoring)}"
        return True, "ok"
