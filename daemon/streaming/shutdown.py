"""The shutdown deadline: from SIGTERM, LSTMD_SHUTDOWN_TIMEOUT_S for the final
checkpoint and the close.

A clock of its own, in a thread, because every wait in the daemon (a retry, a
flush, a transaction) must give up when it passes, wherever the loop's thread is
waiting at that moment: they all watch `abandon`. The shutdown phase itself is
steps of the run loop (loop.py).
"""

from __future__ import annotations

import threading
import time

# Of the shutdown budget, what is kept for a producer bootstrap already under way
# (BOOTSTRAP_TIMEOUT_MS) and for closing the clients: retries give up before it.
SHUTDOWN_RESERVE_S = 7.0
# The most closing the group's consumer may wait for its coordinator (leaving the group).
CONSUMER_CLOSE_TIMEOUT_S = 3.0


class ShutdownDeadline:
    """`abandon` is set SHUTDOWN_RESERVE_S before the deadline: every retry in hand
    gives up then, and what is left of the budget closes the clients."""

    def __init__(self, stop: threading.Event, timeout_s: float) -> None:
        self.stop = stop
        self.timeout_s = timeout_s
        self.abandon = threading.Event()
        self._deadline: float | None = None

    def watch(self) -> None:
        """Start the clock's thread: it waits for `stop`, then for the deadline."""
        threading.Thread(target=self._run, name="lstmd-shutdown-deadline", daemon=True).start()

    def _run(self) -> None:
        self.stop.wait()
        self._deadline = time.monotonic() + self.timeout_s
        if not self.abandon.wait(max(0.0, self.timeout_s - SHUTDOWN_RESERVE_S)):
            self.abandon.set()

    def close_budget(self) -> float:
        """What is left of the shutdown budget for closing the producer (its flush)."""
        if self._deadline is None:
            return SHUTDOWN_RESERVE_S
        return max(1.0, self._deadline - time.monotonic())

    def consumer_close_ms(self) -> int:
        """Leaving the group waits for the coordinator: bounded like every wait here,
        so a broker outage at shutdown cannot hold the process past its deadline."""
        return int(min(CONSUMER_CLOSE_TIMEOUT_S, self.close_budget() / 2) * 1000)
