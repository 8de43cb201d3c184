"""The `profile` section (not in the default run): one fast e2e round with a
sampling profiler on the run loop's thread.

Every `profile_interval_s`, the sampler names the phase of the run loop's stack
(PHASE_RULES, by source file of the current layout): the wall time per event by
phase (poll and fetch in kafka-python, codec.decode, processor bookkeeping,
engine step, encode_prediction, prometheus metrics, producer.send of outputs and
of state records, flush and acks, commit, state snapshots), in microseconds per
event.
"""

from __future__ import annotations

import linecache
import os
import sys
import threading
import time
from typing import Any

from daemon.devtools.bench.broker import BROKER
from daemon.devtools.bench.config import E2E_MODEL, BenchConfig, Log, Row
from daemon.devtools.bench.e2e import ENGINE_CACHE, E2ESection, Round

# (file suffix, function or None for any, text in the source line or None, phase),
# tried on each frame from the innermost outwards; the first match names the sample.
# A suffix is a path under the repository (a folder if it ends with "/"): a file
# that moves must move here too (tests/devtools/test_bench.py checks that they exist).
PHASE_RULES: tuple[tuple[str, str | None, str | None, str], ...] = (
    ("prometheus_client", None, None, "prometheus metrics"),
    ("daemon/core/codec.py", "decode", None, "codec.decode"),
    ("daemon/core/codec.py", "_flag", None, "codec.decode"),
    ("daemon/core/codec.py", "_features", None, "codec.decode"),
    ("daemon/core/codec.py", "encode_prediction", None, "encode_prediction"),
    ("daemon/inference/engines/fast/", None, None, "engine step"),
    ("daemon/inference/engines/keras.py", None, None, "engine step"),
    ("daemon/inference/engines/contract.py", None, None, "engine step"),
    ("daemon/core/state.py", "snapshot", None, "state snapshots (take_changes)"),
    ("daemon/core/state.py", "take_changes", None, "state snapshots (take_changes)"),
    ("daemon/core/state.py", None, None, "processor bookkeeping"),
    ("daemon/core/processor.py", None, "engine.step", "engine step"),
    ("daemon/core/processor.py", None, None, "processor bookkeeping"),
    # A producer.py frame without a rule (send_to, say) is named by its caller.
    ("daemon/streaming/delivery/producer.py", "_send_one", "wire_key", "producer.send (state records)"),
    ("daemon/streaming/delivery/producer.py", "_send_one", None, "producer.send (outputs)"),
    ("daemon/streaming/delivery/producer.py", "_send_output", None, "producer.send (outputs)"),
    ("daemon/streaming/delivery/producer.py", "send", None, "producer.send (outputs)"),
    ("daemon/streaming/delivery/producer.py", "flush", None, "flush (wait for acks)"),
    ("daemon/streaming/delivery/producer.py", "note_oversized", None, "futures check"),
    ("daemon/streaming/delivery/order.py", None, None, "futures check"),
    ("daemon/streaming/delivery/at_least_once.py", "send", None, "producer.send (outputs)"),
    ("daemon/streaming/delivery/at_least_once.py", "add", None, "producer.send (outputs)"),
    ("daemon/streaming/delivery/at_least_once.py", "reap", None, "futures check"),
    ("daemon/streaming/delivery/at_least_once.py", "_until_acknowledged", "succeeded", "futures check"),
    ("daemon/streaming/delivery/at_least_once.py", "_commit_offsets", None, "offset commit"),
    ("daemon/streaming/delivery/pipeline.py", "_account", None, "checkpoint accounting"),
    ("daemon/streaming/delivery/at_least_once.py", None, None, "checkpoint other"),
    ("daemon/streaming/delivery/transactional.py", None, None, "checkpoint other"),
    ("daemon/streaming/delivery/pipeline.py", None, None, "checkpoint other"),
    ("daemon/streaming/restore.py", None, None, "checkpoint other"),  # in checkpointing.py before
    ("daemon/streaming/loop.py", None, "consumer.poll", "poll (fetch, parse: kafka-python)"),
    ("daemon/streaming/loop.py", None, "take_changes", "state snapshots (take_changes)"),
    ("daemon/streaming/loop.py", None, "StateRecord", "state snapshots (take_changes)"),
    ("daemon/streaming/housekeeping.py", None, None, "housekeeping"),
    ("daemon/streaming/layout.py", None, None, "housekeeping"),
    ("daemon/streaming/loop.py", None, None, "run loop other"),
    ("daemon/streaming/assignment.py", None, None, "run loop other"),
    ("daemon/streaming/checkpoints.py", None, None, "checkpoint other"),
)
IDLE_FUNCTIONS = frozenset({"select", "poll", "wait", "sleep", "_wait_for_tstate_lock", "acquire"})


def classify(frame: Any) -> str:
    """The phase of a sample: the first rule matching a frame, innermost first."""
    f = frame
    while f is not None:
        code = f.f_code
        filename = code.co_filename.replace(os.sep, "/")
        for suffix, function, text, phase in PHASE_RULES:
            if suffix not in filename or (function is not None and code.co_name != function):
                continue
            # f_lineno is None while a frame is between lines (seen under the sampler)
            if text is not None and text not in linecache.getline(code.co_filename, f.f_lineno or 0):
                continue
            return phase
        f = f.f_back
    return "other"


class Sampler:
    """A statistical profiler of one thread: every `interval` seconds, the phase of
    its current stack (wall time: waiting on the network counts where it waits), and
    whether each other thread was busy or blocked."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.target: int | None = None
        self.samples: list[tuple[float, str]] = []
        self.others: dict[str, list[int]] = {}  # thread name -> [busy, idle]
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self, target: int) -> None:
        """Sample thread `target` (again called for a retried round: switch to it)."""
        self.target = target
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(5)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._halt.wait(self.interval):
            now = time.perf_counter()
            frames = sys._current_frames()
            frame = frames.get(self.target) if self.target is not None else None
            if frame is not None:
                self.samples.append((now, classify(frame)))
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, other in frames.items():
                if ident in (me, self.target):
                    continue
                busy = other.f_code.co_name not in IDLE_FUNCTIONS
                counts = self.others.setdefault(names.get(ident, str(ident)), [0, 0])
                counts[0 if busy else 1] += 1


class ProfileSection:
    """One fast e2e round under the sampler (see the module docstring)."""

    name = "profile"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        bootstrap, input_topic = BROKER.input_topic(config, log)
        ENGINE_CACHE.get("fast")
        sampler = Sampler(config.profile_interval_s)
        log(
            f"bench: profile: one fast e2e round ({config.e2e_events:,} events), "
            f"sampling every {config.profile_interval_s * 1e3:g} ms ..."
        )
        # A thread holding the GIL gives it up only every switch interval (5 ms): the
        # sampler would mostly see the run loop when it blocks. A short one lets the
        # sampler in while the run loop computes.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, config.profile_interval_s / 5))
        try:
            round_ = E2ESection.one(
                bootstrap, input_topic, "fast", config.e2e_events, config, on_thread=sampler.start
            )
        finally:
            sys.setswitchinterval(interval)
            sampler.stop()
        return profile_rows(round_, sampler)


def profile_rows(round_: Round, sampler: Sampler) -> list[Row]:
    """Microseconds per event by phase, over the round's timing window."""
    window = round_.window()
    if round_.error or window is None:
        return [
            {
                "section": "profile",
                "model": E2E_MODEL,
                "engine": "fast",
                "requested": "fast",
                "phase": "(failed)",
                "us_per_event": None,
                "share": None,
                "samples": 0,
                "note": round_.error or "no timing window",
            }
        ]
    events, seconds = window
    start, end = round_.marks[0][0], round_.marks[-1][0]
    inside = [phase for t, phase in sampler.samples if start <= t <= end]
    counts: dict[str, int] = {}
    for phase in inside:
        counts[phase] = counts.get(phase, 0) + 1
    total = len(inside) or 1
    rows: list[Row] = []
    for phase, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        rows.append(
            {
                "section": "profile",
                "model": E2E_MODEL,
                "engine": "fast",
                "requested": "fast",
                "phase": phase,
                "us_per_event": n / total * seconds / events * 1e6,
                "share": n / total,
                "samples": n,
                "note": "",
            }
        )
    threads = {
        name: busy / max(1, busy + idle) for name, (busy, idle) in sampler.others.items() if busy + idle
    }
    rows.append(
        {
            "section": "profile",
            "model": E2E_MODEL,
            "engine": "fast",
            "requested": "fast",
            "phase": "(total)",
            "us_per_event": seconds / events * 1e6,
            "share": 1.0,
            "samples": total,
            "events": events,
            "events_per_s": events / seconds,
            "threads_busy": threads,
            "note": "",
        }
    )
    return rows
