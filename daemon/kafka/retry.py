"""Retrying what Kafka refuses for now: one backoff for every retry loop."""

from __future__ import annotations

import threading
from collections.abc import Callable

# The longest wait between two attempts (to connect, produce, commit).
MAX_RETRY_DELAY_S = 30.0
# A long wait is cut into slices of at most this, each one a liveness beat: waiting
# on Kafka is not being stuck.
BEAT_EVERY_S = 5.0


class Backoff:
    """Doubling waits between attempts at something Kafka refuses for now, cut short
    when `stop` is set (at start-up: SIGTERM; with work in hand: the shutdown
    deadline, so a retry in progress at SIGTERM still gets its chance)."""

    def __init__(
        self, stop: threading.Event, first_s: float = 0.5, beat: Callable[[], None] = lambda: None
    ) -> None:
        self.stop = stop
        self.delay = first_s
        self.beat = beat

    def wait(self) -> bool:
        """Wait the current delay, then double it; True if asked to stop meanwhile."""
        left = self.delay
        while left > 0:
            self.beat()
            if self.stop.wait(min(left, BEAT_EVERY_S)):
                return True
            left -= BEAT_EVERY_S
        self.delay = min(self.delay * 2, MAX_RETRY_DELAY_S)
        return False
