"""Retrying what Kafka refuses for now: one backoff for every retry loop."""

from __future__ import annotations

import threading

# The longest wait between two attempts (to connect, produce, commit).
MAX_RETRY_DELAY_S = 30.0


class Backoff:
    """Doubling waits between attempts at something Kafka refuses for now, cut short
    when the daemon is asked to stop."""

    def __init__(self, stop: threading.Event, first_s: float = 0.5) -> None:
        self.stop = stop
        self.delay = first_s

    def wait(self) -> bool:
        """Wait the current delay, then double it; True if asked to stop meanwhile."""
        if self.stop.wait(self.delay):
            return True
        self.delay = min(self.delay * 2, MAX_RETRY_DELAY_S)
        return False
