"""Followers: models that step the live input beside the serving one, each with states
of its own, without answering on the output topic.

Two kinds (`Role`): a shadow (LSTMD_SHADOW_MODEL_PATH) publishes its predictions to
the shadow topic and is compared with the serving model live; a candidate (a new file
at LSTMD_MODEL_PATH, promote.py) publishes nothing until it is promoted.

A follower's state of a sequence is exact only if it saw the sequence from its first
input. So per partition a follower is first *building*: a catch-up of its own (a
reader of the input topic, in slices between polls, as a rebuild) steps again the
inputs of the sequences open in the serving store when the build began (each from
its first input, `rebuild.plan`, bounded by LSTMD_REBUILD_MAX_EVENTS), then every
input after that, in rounds, each up to where the run loop has got; when a round ends
exactly where the loop stands, the follower *follows*: from the next batch on it
steps the loop's own records. Nothing of a building partition is published or
written, and the partition serves meanwhile as always (no pause, /readyz stays 200).

Once following, its states are checkpointed with the serving model's, in the same
checkpoint or transaction, under keys of their own in the state topic
(`daemon.core.state.state_key`), with a marker saying they are exact: the next
owner of the partition restores them and follows at once. A sequence the build
could not replay (its history gone, over the budget) is inexact: nothing of it is
published until it starts over.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.records import InputRecord, Kind, OutputRecord, StateRecord
from daemon.core.state import (
    NO_OFFSET,
    SavedState,
    SequenceState,
    model_tag,
)
from daemon.kafka.port import Reader
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.schemas.wire import InputSchemas
from daemon.streaming.catchup import CatchUp, Pace
from daemon.streaming.rebuild import (
    BEGINNING_TIMEOUT_MS,
    INITIAL_COST_S,
    MAX_POLL_RECORDS,
    MIN_POLL_RECORDS,
    NEVER_MS,
    Recompute,
    plan,
)
from daemon.streaming.restore import adopt

log = get_logger("daemon.streaming.loop")

At = tuple[int, int]  # (partition, offset) of an input

# One step of a build holds the loop at most this long: the partitions serve
# meanwhile, and a rebuild's half second would be their latency. The loop polls
# without waiting while a build is under way (`Followers.building`), so an idle
# partition's build still gets the loop's time.
FOLLOW_SLICE_S = 0.1


class Role(enum.Enum):
    SHADOW = "shadow"  # publishes to the shadow topic, compared with the serving model
    CANDIDATE = "candidate"  # publishes nothing; promoted once it follows every partition


class Phase(enum.Enum):
    WAITING = "waiting"  # owned, its build not begun (the partition not serving yet)
    BUILDING = "building"
    FOLLOWING = "following"


@dataclass
class _Building:
    """One partition's build: the serving store's open sequences when it began, and
    where the live input stood (`live_from`: from there on every record is stepped)."""

    saved: dict[str, SequenceState]
    live_from: int
    recompute: Recompute | None = None  # the first round's replay, once its bounds are known
    resume: int | None = None  # the end of the round read last
    rounds: int = 0
    began: float = field(default_factory=time.monotonic)


@dataclass
class _Reading:
    """What a build does with the input topic (catchup.Reading)."""

    follower: Follower

    def bounds(self, partition: int, into: _Building, beginning: int | None, end: int) -> tuple[int, int]:
        f = self.follower
        live = f.live_next(partition)
        stop = min(end, live if live is not None else end)
        into.rounds += 1
        if into.recompute is None:
            assert beginning is not None  # needs_beginning
            todo = plan(partition, into.saved, beginning, f.budget, into.live_from)
            into.recompute = Recompute(todo, into.saved, f.processor)
            start = todo.start if todo.spans else into.live_from
        else:
            assert into.resume is not None
            start = into.resume
        into.resume = max(start, stop)
        return start, into.resume

    def read(self, partition: int, into: _Building, records: Sequence[InputRecord]) -> None:
        """Raises RegistryUnavailable before anything is stepped: read again later."""
        f = self.follower
        if f.schemas is not None:
            f.schemas.resolve(records)
        assert into.recompute is not None and into.resume is not None
        # Not beyond the round's end: the loop has not processed those yet, and the
        # model joins only where the loop stands (a reader fetches past the end).
        before = [r for r in records if r.offset < into.live_from]
        after = [r for r in records if into.live_from <= r.offset < into.resume]
        with f.withheld():
            if before:
                into.recompute.feed(before)
            if after:
                f.processor.process(after)


@dataclass
class Comparison:
    """The serving model's and a shadow's predictions of the same inputs, compared."""

    tolerance: float
    metrics: Metrics

    def observe(self, serving: Mapping[At, list[float]], shadow: Mapping[At, list[float]]) -> None:
        """Each event both predicted: the largest difference of their outputs' components."""
        within = beyond = 0
        for at, y in shadow.items():
            other = serving.get(at)
            if other is None or len(other) != len(y):
                continue  # a dead letter of one of them, or outputs of other widths
            diff = max((abs(a - b) for a, b in zip(y, other, strict=True)), default=0.0)
            self.metrics.shadow_abs_diff.observe(diff)
            if diff <= self.tolerance:
                within += 1
            else:
                beyond += 1
        if within:
            self.metrics.shadow_compared.labels(within_tolerance="true").inc(within)
        if beyond:
            self.metrics.shadow_compared.labels(within_tolerance="false").inc(beyond)


class Follower:
    """One model following the owned partitions beside the serving one (see the top)."""

    def __init__(
        self,
        processor: Processor,
        role: Role,
        settings: Settings,
        metrics: Metrics,
        live_next: Callable[[int], int | None],
        schemas: InputSchemas | None = None,
    ) -> None:
        """`processor`: the model's own (its store, its engine; metrics discarding: the
        inputs are counted once, by the serving model). `live_next(p)`: the next offset
        the run loop processes in partition p, None while unknown."""
        self.processor = processor
        self.role = role
        self.settings = settings
        self.metrics = metrics
        self.live_next = live_next
        self.schemas = schemas
        self.budget = settings.rebuild_budget
        self.tag = model_tag(processor.model_id)
        self.phases: dict[int, Phase] = {}
        self._reads: CatchUp[_Building] | None = None
        self._markers: list[StateRecord] = []
        processor.ys = {}

    @property
    def model_id(self) -> str:
        return self.processor.model_id

    def attach(self, make_reader: Callable[[], Reader]) -> None:
        """The run's reader factory: a build's catch-up reads the input on one of its own."""
        pace = Pace(FOLLOW_SLICE_S, BEGINNING_TIMEOUT_MS, MIN_POLL_RECORDS, MAX_POLL_RECORDS, INITIAL_COST_S)
        self._reads = CatchUp[_Building](
            make_reader,
            self.settings,
            self.settings.input_topic,
            _Reading(self),
            pace,
            waiting=f"{self.role.value}_build_waiting",
            needs_beginning=True,
        )

    def close(self) -> None:
        if self._reads is not None:
            self._reads.close()

    @contextlib.contextmanager
    def withheld(self) -> Iterator[None]:
        """Steps of a build publish nothing: their predictions are not even encoded."""
        before = self.processor.publish_from_ms
        self.processor.publish_from_ms = NEVER_MS
        try:
            yield
        finally:
            self.processor.publish_from_ms = before

    # -- partitions -----------------------------------------------------------------
    def restored(self, partition: int, states: Mapping[str, SavedState] | None, following: bool) -> None:
        """A partition restored: with the states this model left (and its marker: they
        are exact) it follows at once; else it waits to build."""
        store = self.processor.store
        store.drop_partition(partition)
        if following and states is not None:
            # Installed as the serving model's are (`adopt`); a state that cannot be read
            # or does not fit keeps its watermark, and its sequence is not exact any more:
            # it publishes nothing until it starts over.
            for lost in adopt(store, self.model_id, partition, dict(states), self.processor.state_shapes):
                if lost.n:
                    store.get(partition, lost.key).exact = False
            self.phases[partition] = Phase.FOLLOWING
            log.info(f"{self.role.value}_following", partition=partition, states=len(states), restored=True)
        else:
            self.phases[partition] = Phase.WAITING
        self._gauge()

    def add_partitions(self, partitions: Iterable[int]) -> None:
        """Partitions owned before this model came: each built once it serves."""
        for p in partitions:
            self.phases.setdefault(p, Phase.WAITING)
        self._gauge()

    def release(self, partitions: Sequence[int]) -> None:
        """Revoked, lost or rewound: nothing of the partition is kept (its next owner
        restores what was checkpointed, or builds again)."""
        if self._reads is not None:
            self._reads.cancel(list(partitions))
        for p in partitions:
            self.phases.pop(p, None)
            self.processor.store.drop_partition(p)
        self._markers = [m for m in self._markers if m.partition not in partitions]
        self._gauge()

    def step(self, serving: Processor, active: Callable[[int], bool]) -> list[int]:
        """Begin the builds of the serving partitions waiting, move the builds on; the
        partitions that now follow."""
        assert self._reads is not None, "attach() first"
        for p in [p for p, ph in self.phases.items() if ph is Phase.WAITING and active(p)]:
            self._begin(p, serving)
        joined = []
        if self._reads.active:
            for p, into, seconds in self._reads.step():
                if self.live_next(p) == into.resume:
                    self._join(p, into, seconds)
                    joined.append(p)
                else:  # the loop moved on meanwhile: another round, from where this one ended
                    self._reads.begin(p, into)
        return joined

    def _begin(self, partition: int, serving: Processor) -> None:
        live = self.live_next(partition)
        if live is None:
            return  # not known yet: asked again at the next step
        # What the open states say where their inputs are, as they are now (the live
        # ones move on); their tensors are of no use to another model.
        saved = {key: replace(s, tensors=None) for p, key, s in serving.store if p == partition and s.n}
        self.processor.store.drop_partition(partition)
        assert self._reads is not None
        self._reads.begin(partition, _Building(saved, live))
        self.phases[partition] = Phase.BUILDING
        self._gauge()
        log.info(
            f"{self.role.value}_building",
            partition=partition,
            model=self.model_id,
            open_sequences=len(saved),
            live_from=live,
        )

    def _join(self, partition: int, into: _Building, seconds: float) -> None:
        recompute = into.recompute
        assert recompute is not None
        lost = recompute.unbuilt()
        store = self.processor.store
        # A sequence the build could not replay: its state from its later inputs (if
        # any, else an empty one) is not exact, and publishes nothing until it starts
        # over; one that ended since is exact.
        inexact = 0
        for key in lost:
            state = store.peek(partition, key)
            if state is None and store.watermark(partition, key) != NO_OFFSET:
                continue  # ended since the build began
            state = store.get(partition, key)
            state.exact = False
            inexact += 1
        store.mark_partition(partition)
        marker = StateRecord(partition, "", self.model_id.encode(), owner=self.tag, following=True)
        self._markers.append(marker)
        self.phases[partition] = Phase.FOLLOWING
        self._gauge()
        log.info(
            f"{self.role.value}_following",
            partition=partition,
            model=self.model_id,
            rebuilt=len(into.saved) - len(lost),
            inexact=inexact,
            events_read=recompute.read,
            events_replayed=recompute.replayed,
            rounds=into.rounds,
            seconds=round(seconds, 3),
        )

    def following(self, partition: int) -> bool:
        return self.phases.get(partition) is Phase.FOLLOWING

    def building(self) -> bool:
        return any(ph is Phase.BUILDING for ph in self.phases.values())

    def follows_all(self, partitions: frozenset[int]) -> bool:
        return bool(partitions) and all(self.following(p) for p in partitions)

    # -- the live batches -----------------------------------------------------------
    def process(self, batch: Sequence[InputRecord]) -> list[OutputRecord]:
        """Step the batch's records of the partitions followed; a shadow's outputs (its
        predictions and notices, for the shadow topic), a candidate's none."""
        mine = [r for r in batch if self.phases.get(r.partition) is Phase.FOLLOWING]
        self.processor.ys = {}
        if not mine:
            return []
        outputs = self.processor.process(mine)
        if self.role is not Role.SHADOW:
            return []
        # The serving model dead-letters the input; an inexact state predicted nothing.
        shadow = [replace(o, kind=Kind.SHADOW) for o in outputs if not o.dead_letter]
        self.metrics.shadow_predictions.inc(sum(1 for o in outputs if o.kind is Kind.PREDICTION))
        return shadow

    def evict_idle(self, idle_s: float) -> list[OutputRecord]:
        notices = self.processor.evict_idle(idle_s)
        return [replace(n, kind=Kind.SHADOW) for n in notices] if self.role is Role.SHADOW else []

    # -- checkpoints ----------------------------------------------------------------
    def has_changes(self) -> bool:
        return bool(self._markers) or self.processor.store.has_changes()

    def take_changes(self) -> list[StateRecord]:
        """The state records of the partitions followed (under this model's keys) and
        their markers; a building partition's changes are dropped (written at its join)."""
        followed = {p for p, ph in self.phases.items() if ph is Phase.FOLLOWING}
        out = [
            StateRecord(p, key, value, owner=self.tag)
            for p, key, value in self.processor.store.take_changes(self.model_id, only=followed)
        ]
        out += self._markers
        self._markers = []
        return out

    def _gauge(self) -> None:
        for phase in Phase:
            count = sum(1 for ph in self.phases.values() if ph is phase)
            self.metrics.follower_partitions.labels(role=self.role.value, phase=phase.value).set(count)


class Followers:
    """The run's followers (a shadow, a candidate), moved along with the partitions;
    what the run loop and the checkpoint ask of them all."""

    def __init__(self, metrics: Metrics, tolerance: float) -> None:
        self.metrics = metrics
        self.all: list[Follower] = []
        self.comparison = Comparison(tolerance, metrics)
        # Records of models no follower is any more (a shadow removed, a model promoted
        # away): deleted by the next checkpoint, when their partition is restored.
        self._tombstones: list[StateRecord] = []

    def __bool__(self) -> bool:
        return bool(self.all)

    def add(self, follower: Follower) -> None:
        self.all.append(follower)

    def remove(self, follower: Follower) -> None:
        self.all.remove(follower)
        follower.close()

    def restored(
        self,
        partition: int,
        others: Mapping[str, Mapping[str, SavedState]],
        following: frozenset[str],
    ) -> None:
        """A partition restored: each follower takes its own states (`others`, by model
        tag; `following`: the tags whose states are exact); those of no follower are
        deleted."""
        tags = {f.tag for f in self.all}
        for f in self.all:
            f.restored(partition, others.get(f.tag), f.tag in following)
        for tag in sorted((set(others) | following) - tags):
            self._tombstones += [StateRecord(partition, key, None, owner=tag) for key in others.get(tag, {})]
            if tag in following:
                self._tombstones.append(StateRecord(partition, "", None, owner=tag, following=True))

    def building(self) -> bool:
        """A build is under way: the loop's poll should not wait for records."""
        return any(f.building() for f in self.all)

    def release(self, partitions: Sequence[int]) -> None:
        for f in self.all:
            f.release(partitions)
        self._tombstones = [t for t in self._tombstones if t.partition not in partitions]

    def step(self, serving: Processor, active: Callable[[int], bool]) -> None:
        for f in self.all:
            f.step(serving, active)

    def process(self, serving: Processor, batch: Sequence[InputRecord]) -> list[OutputRecord]:
        """Each follower steps the batch after the serving model; the shadow's outputs,
        its predictions compared with the serving model's."""
        outputs: list[OutputRecord] = []
        for f in self.all:
            outputs += f.process(batch)
            if f.role is Role.SHADOW and serving.ys is not None and f.processor.ys:
                self.comparison.observe(serving.ys, f.processor.ys)
        return outputs

    def evict_idle(self, idle_s: float) -> list[OutputRecord]:
        return [n for f in self.all for n in f.evict_idle(idle_s)]

    def committed(self, partition: int, offset: int) -> list[StateRecord]:
        """As the serving store's: ended sequences below a committed offset are
        forgotten, their records deleted (else each follower's memory of ended
        sequences, and its records, would only grow)."""
        return [
            StateRecord(partition, key, None, owner=f.tag)
            for f in self.all
            if f.following(partition)
            for key in f.processor.store.forget_ended_before(partition, offset)
        ]

    def has_changes(self) -> bool:
        return bool(self._tombstones) or any(f.has_changes() for f in self.all)

    def take_changes(self) -> list[StateRecord]:
        out, self._tombstones = self._tombstones, []
        for f in self.all:
            out += f.take_changes()
        return out

    def close(self) -> None:
        for f in self.all:
            f.close()
