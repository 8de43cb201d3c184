"""Rebuild: open sequences saved under another model, recomputed by this one.

After a model change (LSTMD_ON_MODEL_CHANGE=rebuild) a restored state of another
model is of no use to this one, but its sequence need not start over: its inputs
are still in the input topic, from the state's `first_offset` (its first input
since its last reset) to its `watermark` (the last input it includes). Stepping
exactly those inputs again, in order, through this model's processor builds the state
this model would have built live: the same rules (markers, `step` duplicates and
gaps, dead letters skipped), the same batching engine. Nothing is published for
them: they were answered already, by the old model.

One read of the input partition serves all of its affected sequences, from the
smallest first offset to the largest watermark; each key's records are taken
only within its own span. The read is bounded (LSTMD_REBUILD_MAX_EVENTS records
per partition): a sequence whose first input is gone (retention, deleted
records) or that would take the read beyond the budget is dropped and announced
(`history_expired`, `rebuild_budget`), as `reset` does for every one.

`plan` and `Recompute` are the pure part (no Kafka: unit-tested with records in a
list); `Rebuilder` reads the input partitions for them, a catch-up like the
`Restorer`'s (catchup.py: in slices between polls, on a consumer of its own, no
group, read_committed, so it sees what the group's read_committed consumer saw live). The run loop installs
the rebuilt states, checkpoints them and only then serves the partition: until
then nothing of a rebuild is written, so a revocation or SIGTERM mid-rebuild
leaves the old model's states in the state topic and the next owner rebuilds again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.records import InputRecord
from daemon.core.state import (
    NO_OFFSET,
    UNREADABLE,
    Eviction,
    SavedState,
    SequenceState,
    StateStore,
    same_model,
)
from daemon.kafka.port import Reader
from daemon.ops.metrics import Metrics
from daemon.schemas.wire import InputSchemas
from daemon.streaming.catchup import CatchUp, Pace
from daemon.streaming.restore import RESTORE_SLICE_S

#: A publish cutoff no record timestamp reaches: the recompute's predictions are
#: withheld before they are encoded (the warm-start filter, see Processor).
NEVER_MS = 2**63 - 1
# One poll of a rebuild: at least this many records (progress), at most this many
# (the slice's time bound holds for any engine: its size follows the measured cost).
MIN_POLL_RECORDS = 100
MAX_POLL_RECORDS = 5000
# The first slice's guess of the seconds per record read (then measured).
INITIAL_COST_S = 50e-6
# One wait for the input partition's first and end offsets (asked again at the next step).
BEGINNING_TIMEOUT_MS = 1000

Restored = dict[str, SavedState]


def stale(states: Mapping[str, SavedState], model_id: str) -> dict[str, SequenceState]:
    """The restored open sequences a rebuild recomputes: saved (readably) under another
    model. Reset records carry no tensors and unreadable ones no history: `adopt`
    handles both as it always did."""
    return {
        key: state
        for key, (state, saved_by) in states.items()
        if state.n and saved_by != UNREADABLE and not same_model(saved_by, model_id)
    }


@dataclass(frozen=True, slots=True)
class Span:
    """The offsets of one sequence's inputs to read again, both included."""

    first: int
    watermark: int


@dataclass
class Plan:
    """What one partition's rebuild reads: [start, end) of the input partition, and
    of it each kept sequence's span; the sequences it cannot rebuild, as evictions."""

    partition: int
    spans: dict[bytes, Span]  # by record key (the sequence id's UTF-8 bytes)
    start: int
    end: int
    dropped: list[Eviction]


def plan(
    partition: int,
    states: Mapping[str, SequenceState],
    beginning: int,
    budget: int,
    end_offset: int | None = None,
) -> Plan:
    """The read that rebuilds `states` (open sequences of another model) from an input
    partition whose first offset is `beginning` (and whose end, if known, is
    `end_offset`), reading at most `budget` records.

    A sequence whose first input is before `beginning` (or unknown) cannot be rebuilt
    exactly: `history_expired`; so is one whose watermark is not below the end (its
    inputs are not in the topic: it was recreated), or the read would never end.
    Of the others, the read ends after the last watermark (the newest input any of
    them includes) and starts no earlier than `budget`
    offsets before that end (offsets bound the records read from above); a sequence
    that began before that is `rebuild_budget`. The oldest sequences are the ones
    dropped: they would cost the most to recompute.
    """
    dropped: list[Eviction] = []
    rebuildable: dict[str, SequenceState] = {}
    for key, state in sorted(states.items()):
        if (
            state.first_offset == NO_OFFSET
            or state.first_offset < beginning
            or (end_offset is not None and state.watermark >= end_offset)
        ):
            dropped.append(Eviction(partition, key, "history_expired", state.n, state.watermark))
        else:
            rebuildable[key] = state
    end = max((s.watermark for s in rebuildable.values()), default=NO_OFFSET) + 1
    spans: dict[bytes, Span] = {}
    for key, state in rebuildable.items():
        if state.first_offset < end - budget:
            dropped.append(Eviction(partition, key, "rebuild_budget", state.n, state.watermark))
        else:
            spans[key.encode()] = Span(state.first_offset, state.watermark)
    if not spans:
        return Plan(partition, {}, 0, 0, dropped)
    start = min(s.first for s in spans.values())
    return Plan(partition, spans, start, max(s.watermark for s in spans.values()) + 1, dropped)


def rebuild_processor(live: Processor) -> Processor:
    """A processor like `live` (its engine, model and rules) over a store of its own
    that publishes no prediction. It counts nothing (`Metrics.discarding`): the
    inputs read again were consumed and answered already, and counting them again
    would skew the live counters (the rebuild has its own)."""
    return Processor(
        live.engine,
        model_id=live.model_id,
        n_features=live.n_features,
        store=StateStore(0),
        metrics=Metrics.discarding(),
        max_record_bytes=live.max_record_bytes,
        reset_on_gap=live.reset_on_gap,
        clock=live.clock,
        state_shapes=live.state_shapes,
        publish_from_ms=NEVER_MS,
        wire=live.wire,
    )


@dataclass
class Rebuilt:
    """One partition's rebuild, done: what the run loop installs and announces."""

    partition: int
    states: Restored  # every restored state of the partition, the rebuilt ones in place: for `adopt`
    changed: list[str]  # rebuilt or dropped: their state records must be rewritten
    evictions: list[Eviction]  # the sequences that could not be rebuilt
    rebuilt: int  # sequences rebuilt
    read: int  # input records read
    replayed: int  # of them, inputs stepped through the model
    seconds: float = 0.0


class Recompute:
    """One partition's rebuild, fed the input records of its plan's range in offset
    order (in any slices); no I/O."""

    def __init__(self, plan: Plan, saved: Mapping[str, SequenceState], processor: Processor) -> None:
        """`saved`: the restored states being rebuilt (their counts, watermarks and
        last use, for the notices and the eviction order)."""
        self.plan = plan
        self.saved = saved
        self.processor = processor
        self.read = 0
        self.replayed = 0
        self._started: set[bytes] = set()
        self._lost: set[bytes] = set()

    def feed(self, records: Sequence[InputRecord]) -> None:
        """Step the records of the sequences being rebuilt, each within its span.

        A sequence's first input must be the first of its records seen: if it is
        missing (deleted while the rebuild read), the sequence is lost rather than
        rebuilt from the middle.
        """
        spans, start, end = self.plan.spans, self.plan.start, self.plan.end
        wanted = []
        for rec in records:
            if not start <= rec.offset < end:
                continue
            self.read += 1
            key = rec.key
            span = spans.get(key) if key is not None else None
            if span is None or not span.first <= rec.offset <= span.watermark or key in self._lost:
                continue
            assert key is not None
            if key not in self._started:
                if rec.offset != span.first:
                    self._lost.add(key)
                    continue
                self._started.add(key)
            wanted.append(rec)
        if wanted:
            self.processor.process(wanted)
            self.replayed += len(wanted)

    def unbuilt(self) -> list[str]:
        """The sequences of the plan not rebuilt (so far): dropped by the plan, their
        first input not seen, or lost."""
        missing = [k for k in self.plan.spans if k not in self._started or k in self._lost]
        return sorted([ev.key for ev in self.plan.dropped] + [k.decode() for k in missing])

    def finish(self, restored: Restored) -> Rebuilt:
        """The partition's states for `adopt`: `restored` with each rebuilt state in
        place (as this model's) and each dropped one as a reset state keeping its
        watermark and last step, so no input the old model answered is answered again."""
        p, model_id = self.plan.partition, self.processor.model_id
        states = dict(restored)
        evictions = list(self.plan.dropped)
        for key in sorted(self.plan.spans):
            name = key.decode()
            saved = self.saved[name]
            if key not in self._started or key in self._lost:
                evictions.append(Eviction(p, name, "history_expired", saved.n, saved.watermark))
                continue
            # The state the recompute left (a reset one keeping the watermark, should
            # this model's steps have left none).
            state = self.processor.store.get(p, name)
            state.last_seen = saved.last_seen
            states[name] = SavedState(state, model_id)
        for ev in evictions:
            saved = self.saved[ev.key]
            states[ev.key] = SavedState(
                SequenceState(watermark=saved.watermark, last_step=saved.last_step), model_id
            )
        return Rebuilt(
            partition=p,
            states=states,
            changed=sorted(self.saved),
            evictions=evictions,
            rebuilt=len(self.saved) - len(evictions),
            read=self.read,
            replayed=self.replayed,
        )


@dataclass
class _Rebuilding:
    restored: Restored
    saved: dict[str, SequenceState]  # the stale ones
    recompute: Recompute | None = None  # None until the partition's first offset is known


class _Inputs:
    """What a rebuild does with the input topic: plan the spans once the partition's
    first and end offsets are known, then feed the recompute."""

    def __init__(self, processor: Processor, budget: int, schemas: InputSchemas | None) -> None:
        self.processor = processor
        self.budget = budget
        self.schemas = schemas

    def bounds(self, partition: int, into: _Rebuilding, beginning: int | None, end: int) -> tuple[int, int]:
        assert beginning is not None  # CatchUp(needs_beginning=True)
        todo = plan(partition, into.saved, beginning, self.budget, end)
        into.recompute = Recompute(todo, into.saved, rebuild_processor(self.processor))
        return todo.start, todo.end  # no span: (0, 0), nothing to read

    def read(self, partition: int, into: _Rebuilding, records: Sequence[InputRecord]) -> None:
        """Raises RegistryUnavailable before anything is fed: the records are read again."""
        assert into.recompute is not None  # bounds come first
        if self.schemas is not None:
            self.schemas.resolve(records)
        into.recompute.feed(records)


class Rebuilder:
    """Rebuilds restored partitions' sequences of another model by reading the input
    topic (a `CatchUp`), in slices between polls (the group consumer keeps polling
    meanwhile, as during a restore: heartbeats and max.poll.interval)."""

    def __init__(
        self,
        make_consumer: Callable[[], Reader],
        settings: Settings,
        metrics: Metrics,
        processor: Processor,
        schemas: InputSchemas | None = None,
    ) -> None:
        """`make_consumer`: the rebuild's consumer (no group, read_committed), opened
        on the first rebuild only: most runs never need one. `schemas`: the input's
        (a registry format), fetched before the records that name them are replayed."""
        self.metrics = metrics
        self.processor = processor
        pace = Pace(RESTORE_SLICE_S, BEGINNING_TIMEOUT_MS, MIN_POLL_RECORDS, MAX_POLL_RECORDS, INITIAL_COST_S)
        self.reads = CatchUp[_Rebuilding](
            make_consumer,
            settings,
            settings.input_topic,
            _Inputs(processor, settings.rebuild_budget, schemas),
            pace,
            waiting="rebuild_waiting",
            needs_beginning=True,
        )
        self.active = self.reads.active

    @property
    def consumer(self) -> Reader:
        return self.reads.consumer

    def close(self) -> None:
        self.reads.close()

    def begin(self, partition: int, states: Restored) -> bool:
        """Start rebuilding a restored partition; False if none of its states needs it.
        Nothing is asked of Kafka before the next step."""
        saved = stale(states, self.processor.model_id)
        if not saved:
            return False
        self.reads.begin(partition, _Rebuilding(states, saved))
        return True

    def cancel(self, partitions: Sequence[int]) -> None:
        """Revoked, lost or rewound: its rebuild is forgotten (nothing of it was written)."""
        self.reads.cancel(partitions)

    def step(self) -> list[Rebuilt]:
        """Read and recompute for at most one slice; return the partitions now rebuilt."""
        done = []
        for _, into, seconds in self.reads.step():
            assert into.recompute is not None  # bounds come first
            result = into.recompute.finish(into.restored)
            result.seconds = seconds
            self.metrics.sequences_rebuilt.inc(result.rebuilt)
            self.metrics.events_replayed.inc(result.replayed)
            self.metrics.rebuild.observe(result.seconds)
            done.append(result)
        return done
