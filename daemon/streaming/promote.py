"""Promotion: a new model at LSTMD_MODEL_PATH served without a restart and without a
pause, every open sequence kept exact.

A Kubernetes ConfigMap or volume update replaces the file under a running pod. A
thread (`ModelFile`) notices it within LSTMD_MODEL_WATCH_INTERVAL_S, waits until the
file stops changing, and loads it beside the serving model (the loop keeps serving
meanwhile). The new model then follows every owned partition as a *candidate*
(daemon/streaming/follow.py: its states built in the background by replaying the open
sequences, then stepping the live batches; it publishes nothing). A shadow whose
file is the new model is that candidate already, built and following.

Once the candidate follows every owned partition and none is restoring, the run loop
switches between two batches: the serving processor takes the candidate's model and
states (`Processor.take_model`), every state is rewritten under the serving keys, the
candidate's own records are deleted, and all of it is checkpointed before the first
prediction of the new model is published. So every prediction before the switch is
the old model's, every one after it the new model's on the whole prefix; in
exactly-once delivery the switch is part of a transaction. A revocation, kill -9 or
SIGTERM before the switch leaves the old model's states (and the candidate's, once it
followed: its next owner, running the new file, takes those at once); after it, the
new model's.
"""

from __future__ import annotations

import gc
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.records import StateRecord
from daemon.core.state import Eviction, SequenceState, model_tag, same_model, snapshot_bytes
from daemon.errors import LstmdError
from daemon.kafka.topics import state_record_bytes
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.streaming.follow import Follower, Followers, Role
from daemon.streaming.lifecycle import Partitions
from daemon.streaming.policy import CheckpointPolicy

log = get_logger("daemon.streaming.loop")

# A changed file is loaded once it has not changed for this long (a copy in progress).
SETTLE_S = 1.0


@dataclass(frozen=True)
class Loaded:
    processor: Processor
    seconds: float


@dataclass(frozen=True)
class Refused:
    path: Path
    error: str


@dataclass(frozen=True)
class Reverted:
    """The file is the serving model's again."""

    tag: str


Event = Loaded | Refused | Reverted


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # through a ConfigMap's symlinks: the file's own inode
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ModelFile:
    """Watches the model file on a thread of its own: hashing and loading a model never
    holds the run loop. What it finds waits in `events` for the loop."""

    def __init__(
        self,
        path: Path,
        interval_s: float,
        load: Callable[[Path], Processor],
        serving_tag: str,
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self.load = load
        self.serving_tag = serving_tag
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lstmd-model-watch", daemon=True)
        self._seen = _stat(path)
        self._tag = serving_tag  # the content last handled

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> list[Event]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._check()
            except Exception as exc:  # never let the watch die: the next check tries again
                log.warning("model_watch_failed", path=str(self.path), error=str(exc))

    def _check(self) -> None:
        seen = _stat(self.path)
        if seen is None or seen == self._seen:
            return
        # Changed: wait until it stops changing (a copy still being written).
        while not self._stop.wait(SETTLE_S):
            now = _stat(self.path)
            if now == seen:
                break
            seen = now
        self._seen = seen
        tag = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        if tag == self._tag:
            return
        self._tag = tag
        if tag == self.serving_tag:
            self.events.put(Reverted(tag))
            return
        log.info("model_file_changed", path=str(self.path), sha256=tag)
        started = time.monotonic()
        try:
            processor = self.load(self.path)
        except (LstmdError, OSError, ValueError) as exc:
            self.events.put(Refused(self.path, str(exc)))
            return
        self.events.put(Loaded(processor, time.monotonic() - started))


class Promotion:
    """The run loop's side of a promotion: the candidate followed, then the switch."""

    def __init__(
        self,
        settings: Settings,
        serving: Processor,
        followers: Followers,
        metrics: Metrics,
        partitions: Partitions,
        policy: CheckpointPolicy,
        make_candidate: Callable[[Processor], Follower],
        watch: ModelFile | None = None,
        state_record_limit: Callable[[], int | None] = lambda: None,
    ) -> None:
        """`watch`: the model file's (None: not watched, nothing is ever promoted).
        `state_record_limit`: the state topic's max.message.bytes as start-up read it."""
        self.settings = settings
        self.serving = serving
        self.followers = followers
        self.metrics = metrics
        self.partitions = partitions
        self.policy = policy
        self.make_candidate = make_candidate
        self.watch = watch
        self.state_record_limit = state_record_limit
        self.candidate: Follower | None = None
        self._began = 0.0

    def step(self) -> bool:
        """Take what the watch found; True when the candidate is ready to switch."""
        if self.watch is not None:
            self.take(self.watch.take())
        return self.ready()

    def take(self, events: list[Event]) -> None:
        """What the model file's watch found: a candidate to follow (or none)."""
        for event in events:
            if isinstance(event, Refused):
                self.metrics.model_swaps.labels(outcome="refused").inc()
                log.error(
                    "model_change_refused",
                    path=str(event.path),
                    error=event.error,
                    serving=self.serving.model_id,
                    action="the serving model goes on",
                )
            elif isinstance(event, Reverted):
                self._drop_candidate("the file is the serving model again")
            else:
                self._follow(event.processor, event.seconds)

    def _follow(self, processor: Processor, seconds: float) -> None:
        problem = self._misfit(processor)
        if problem is not None:
            self.metrics.model_swaps.labels(outcome="refused").inc()
            log.error(
                "model_change_refused",
                model=processor.model_id,
                error=problem,
                serving=self.serving.model_id,
                action="the serving model goes on",
            )
            return
        self._drop_candidate("another model came first")
        shadow = next((f for f in self.followers.all if same_model(f.model_id, processor.model_id)), None)
        if shadow is not None:
            self.candidate = shadow  # built and following already
        else:
            self.candidate = self.make_candidate(processor)
            self.followers.add(self.candidate)
            self.candidate.add_partitions(self.partitions.owned())
        self._began = time.monotonic()
        log.info(
            "model_candidate",
            model=processor.model_id,
            serving=self.serving.model_id,
            engine=processor.engine.name,
            load_seconds=round(seconds, 3),
            shadow=shadow is not None,
        )

    def _misfit(self, processor: Processor) -> str | None:
        """Why the new model cannot serve these inputs and this state topic, or None."""
        if processor.n_features != self.serving.n_features:
            features = processor.n_features, self.serving.n_features
            return "it takes {} features per step, the inputs have {}".format(*features)
        limit = self.state_record_limit()
        if limit is not None and processor.state_shapes is not None:
            needed = state_record_bytes(snapshot_bytes(processor.model_id, processor.state_shapes))
            if needed > limit:
                return (
                    f"its state records take up to {needed} bytes (plus the sequence id), more than the "
                    f"state topic accepts (max.message.bytes={limit}): every checkpoint would be refused"
                )
        return None

    def _drop_candidate(self, reason: str) -> None:
        if self.candidate is None:
            return
        if self.candidate.role is Role.CANDIDATE:
            self.followers.remove(self.candidate)
        self.metrics.model_swaps.labels(outcome="superseded").inc()
        log.info("candidate_dropped", model=self.candidate.model_id, reason=reason)
        self.candidate = None

    def ready(self) -> bool:
        """The candidate follows every owned partition and none is restoring."""
        owned = self.partitions.owned()
        return (
            self.candidate is not None
            and not self.partitions.not_serving()
            and self.candidate.follows_all(owned)
        )

    def switch(self) -> list[Eviction]:
        """Serve the candidate's model with its states, from the next batch on. The
        caller checkpoints at once (before any prediction of the new model). Returns
        the sequences dropped at the switch (not replayable: announced)."""
        candidate = self.candidate
        assert candidate is not None
        old_id, old, old_info = self.serving.model_id, self.serving.store, self.serving.info
        new = candidate.processor.store
        owned = self.partitions.owned()
        dropped: list[Eviction] = []
        tombstones: list[StateRecord] = []
        for p in sorted(owned):  # the candidate's own records go
            tombstones += [StateRecord(p, key, None, owner=candidate.tag) for key in sorted(new.keys(p))]
            tombstones.append(StateRecord(p, "", None, owner=candidate.tag, following=True))
        # Not replayable (history gone, over the budget), or not known to the candidate
        # (evicted by it, not by the old model): starts over, announced.
        for p, key, state in list(new):
            if not state.exact:
                dropped.append(Eviction(p, key, "history_expired", state.n, state.watermark))
        for p, key, state in list(old):
            if p in owned and new.peek(p, key) is None and state.n:
                dropped.append(Eviction(p, key, "model_changed", state.n, state.watermark))
        for ev in dropped:
            was = new.peek(ev.partition, ev.key) or old.peek(ev.partition, ev.key) or SequenceState()
            new.install(ev.partition, ev.key, SequenceState(watermark=ev.watermark, last_step=was.last_step))
        for p in owned:
            new.mark_partition(p)  # rewritten under the serving keys
        self.followers.remove(candidate)
        self.serving.take_model(candidate.processor)
        self.serving.info = candidate.processor.info
        self.policy.model_id = self.serving.model_id
        self.policy.tombstones += tombstones
        if old_info:
            self.metrics.model_info.remove(*old_info.values())
        if self.serving.info:
            self.metrics.model_info.labels(**self.serving.info).set(1)
        self.metrics.model_swaps.labels(outcome="promoted").inc()
        if self.watch is not None:
            self.watch.serving_tag = candidate.tag
        if not any(f.role is Role.SHADOW for f in self.followers.all):
            self.serving.ys = None  # nothing to compare with any more
        log.info(
            "model_promoted",
            model=self.serving.model_id,
            previous=old_id,
            partitions=sorted(owned),
            dropped=len(dropped),
            seconds=round(time.monotonic() - self._began, 3),
        )
        self.candidate = None
        # The old model's objects were frozen at start-up (daemon/pod/serve.py: never
        # scanned by the collector): thawed and collected once, or each promotion
        # would keep a model's memory for good. One full collection, ~0.1 s.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return dropped


def serving_tag(processor: Processor) -> str:
    return model_tag(processor.model_id)


def watch_interval(settings: Settings) -> float | None:
    """The model file's check interval, or None: not watched (0, or not a file)."""
    if not settings.model_watch_interval_s or not os.path.isfile(settings.model_path):
        return None
    return settings.model_watch_interval_s
