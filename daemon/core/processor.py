"""Input records in, output records out: decoding, state and the engine, no I/O.

Shared by `lstmd run` (Kafka) and `lstmd replay` (a file), so both apply
exactly the same semantics. Per-sequence order is the input order; the steps of
different sequences in one batch are grouped into waves (the k-th pending step
of every sequence), which lets a batching engine step them together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from daemon.core import codec
from daemon.core.engine import Engine
from daemon.core.meters import ProcessorMetrics
from daemon.core.records import InputRecord, Kind, OutputRecord, dead_letter
from daemon.core.state import Eviction, SequenceState, StateStore
from daemon.errors import RecordRejected
from daemon.ops.logs import get_logger
from daemon.ops.metrics import RESET_CAUSES, DuplicateCause, ResetCause

log = get_logger(__name__)


@dataclass(slots=True)
class _Wave:
    """The k-th pending input of every sequence in a batch: at most one per state."""

    starts: list[tuple[SequenceState, int]] = field(default_factory=list)
    steps: list[_Step] = field(default_factory=list)
    markers: list[tuple[SequenceState, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Step:
    index: int  # position of the output in the batch
    partition: int
    offset: int
    event: codec.Event
    state: SequenceState
    x: tuple[float, ...]


@dataclass(slots=True)
class _Plan:
    """What `Processor._plan` decided for a batch, for `Processor._apply` to run."""

    outputs: list[OutputRecord | None]  # by input position; dead letters already in
    waves: list[_Wave] = field(default_factory=list)
    # id(state) -> the sequences the batch plans steps, resets or markers for
    touched: dict[int, tuple[int, str, SequenceState]] = field(default_factory=dict)


class Processor:
    """Applies batches of input records to their sequences' states (see `process`)."""

    def __init__(
        self,
        engine: Engine,
        *,
        model_id: str,
        n_features: int,
        store: StateStore,
        metrics: ProcessorMetrics,
        max_record_bytes: int = 1 << 20,
        reset_on_gap: bool = False,
        clock: Callable[[], float] = time.time,
        state_shapes: Sequence[tuple[int, ...]] | None = None,
        publish_from_ms: int | None = None,
        wire: codec.Wire = codec.JSON_WIRE,
    ) -> None:
        """`state_shapes`: the shapes of a state's tensors under this model, so a
        restored state that does not fit is refused (None: not checked).

        `publish_from_ms` (a warm start, LSTMD_PUBLISH_FROM): an input whose record
        timestamp is before it advances its state like any other, but its
        prediction is withheld. Dead letters are not: bad input is always
        published, whatever its time (None: every prediction is published).

        `wire`: how values are read and written (LSTMD_INPUT_FORMAT, LSTMD_OUTPUT_FORMAT
        and the field names; JSON by default)."""
        self.engine = engine
        self.model_id = model_id
        self.n_features = n_features
        self.store = store
        self.metrics = metrics
        self.max_record_bytes = max_record_bytes
        self.reset_on_gap = reset_on_gap
        self.clock = clock
        self.state_shapes = state_shapes
        self.publish_from_ms = publish_from_ms
        self.wire = wire
        # The labels of lstmd_model_info for this model (set by daemon.pipeline).
        self.info: dict[str, str] = {}
        # The outputs' y by (partition, offset) of the last batch, when set to a dict
        # (a shadow is compared with the serving model); None: not kept.
        self.ys: dict[tuple[int, int], list[float]] | None = None
        self._inference = metrics.inference.labels(engine=engine.name)
        self._resets = {c: metrics.resets.labels(cause=c) for c in RESET_CAUSES}

    def take_model(self, other: Processor) -> None:
        """Serve `other`'s model with `other`'s states from now on (a promotion): its
        engine, identity and shapes, and its store's contents moved into this one's
        store in place, so every part of the run holding this processor or its store
        sees the new model. `other` is not used afterwards."""
        self.engine = other.engine
        self.model_id = other.model_id
        self.n_features = other.n_features
        self.state_shapes = other.state_shapes
        self.store.replace_with(other.store)
        self._inference = self.metrics.inference.labels(engine=other.engine.name)

    def process(self, records: Sequence[InputRecord]) -> list[OutputRecord]:
        """Apply a batch; outputs come in input order, one per record at most.

        A pure end marker and a skipped duplicate produce no output. In two passes:
        `_plan` decides, record by record and without touching a state's tensors, what
        each record does (nothing, a dead letter, a reset, a step), so that `_apply`
        can step each wave of the batch in one engine call.
        """
        self.metrics.events_consumed.inc(len(records))
        if self.ys is not None:
            self.ys = {}
        plan = self._plan(records)
        self._apply(plan, records)
        result = [o for o in plan.outputs if o is not None]
        result += self.announce(self.store.evict_over_capacity())
        self.metrics.active_sequences.set(len(self.store))
        return result

    def _plan(self, records: Sequence[InputRecord]) -> _Plan:
        """Sort the batch into waves, dead letters and skipped duplicates.

        Only the bookkeeping the next records of the batch depend on changes here: the
        partition's processed offset, and each state's `last_step` (a reset planned
        earlier in the batch already counts for the steps after it)."""
        plan = _Plan(outputs=[None] * len(records))
        depth: dict[int, int] = {}  # id(state) -> its steps planned so far in this batch
        for i, rec in enumerate(records):
            event = self._admit(i, rec, plan)
            if event is None:
                continue
            state = self.store.get(rec.partition, event.key)
            start = self._follow_step(rec, event, state, plan)
            if start is None:
                continue
            k = depth.get(id(state), 0)
            depth[id(state)] = k + 1
            plan.touched[id(state)] = (rec.partition, event.key, state)
            while len(plan.waves) <= k:
                plan.waves.append(_Wave())
            wave = plan.waves[k]
            if start:
                wave.starts.append((state, rec.offset))
            if event.x is None:  # a pure end marker: reset only, no prediction
                wave.markers.append((state, rec.offset))
            else:
                wave.steps.append(_Step(i, rec.partition, rec.offset, event, state, event.x))
        return plan

    def _admit(self, i: int, rec: InputRecord, plan: _Plan) -> codec.Event | None:
        """The record's event, or None: a redelivered input (counted), or one that
        cannot be decoded (its dead letter planned as output `i`)."""
        if rec.offset <= self.store.processed_to(rec.partition):
            self._skipped("redelivered")
            return None
        self.store.advance(rec.partition, rec.offset)
        try:
            event = codec.decode(rec.key, rec.value, self.n_features, self.max_record_bytes, self.wire)
        except RecordRejected as exc:
            plan.outputs[i] = self._dead_letter(rec, exc)
            return None
        if rec.offset <= self.store.watermark(rec.partition, event.key):
            # Restored from a checkpoint that already includes this input.
            self._skipped("redelivered")
            return None
        return event

    def _follow_step(
        self, rec: InputRecord, event: codec.Event, state: SequenceState, plan: _Plan
    ) -> bool | None:
        """Whether the state resets before this input (its `start`, or a step gap under
        LSTMD_STEP_GAP=reset), or None for a repeated step (counted, skipped). Keeps the
        state's `last_step` as this batch's plan leaves it."""
        start = event.start
        if start:
            state.last_step = None
        if event.step is not None and state.last_step is not None:
            if event.step <= state.last_step:
                self._skipped("step")
                if id(state) not in plan.touched:
                    # A retry of an evicted sequence's step: it must not revive
                    # an empty state (which could evict a live one).
                    self.store.forget_if_empty(rec.partition, event.key)
                return None
            if event.step > state.last_step + 1:
                self.metrics.step_gaps.inc()
                log.info(
                    "step_gap",
                    seq=event.key,
                    partition=rec.partition,
                    offset=rec.offset,
                    expected=state.last_step + 1,
                    got=event.step,
                    action="reset" if self.reset_on_gap else "continue",
                )
                start = start or self.reset_on_gap
        # An input without a step keeps the last one seen: a retried step right
        # after it is still recognised as a duplicate.
        if event.end:
            state.last_step = None
        elif event.step is not None:
            state.last_step = event.step
        return start

    def _apply(self, plan: _Plan, records: Sequence[InputRecord]) -> None:
        """Run the plan wave by wave (resets, one engine call, end markers), then tell
        the store which sequences ended and which were used."""
        for wave in plan.waves:
            for state, offset in wave.starts:
                self._reset(state, offset, "start")
            if wave.steps:
                self._step(wave.steps, records, plan.outputs)
            for state, offset in wave.markers:
                self._reset(state, offset, "marker")
        for partition, key, state in plan.touched.values():
            if state.n == 0:  # ended or reset: a fresh state is zeros, keep only its watermark
                self.store.end(partition, key)
            else:
                self.store.mark_changed(partition, key)

    def _skipped(self, cause: DuplicateCause) -> None:
        self.metrics.duplicates.labels(cause=cause).inc()

    def _reset(self, state: SequenceState, offset: int, cause: ResetCause) -> None:
        """Reset a state at input `offset`, which it then includes, counted by cause."""
        state.reset()
        state.watermark = offset
        self._resets[cause].inc()

    def evict_idle(self, idle_s: float) -> list[OutputRecord]:
        """Drop states idle for longer than `idle_s`; returns their announcements."""
        out = self.announce(self.store.evict_idle(idle_s))
        self.metrics.active_sequences.set(len(self.store))
        return out

    def announce(self, evictions: Sequence[Eviction]) -> list[OutputRecord]:
        """Notices (output records) for states dropped before their end; counted by cause."""
        now = self.clock()
        out = []
        for ev in evictions:
            self.metrics.evictions.labels(cause=ev.cause).inc()
            out.append(
                OutputRecord(
                    kind=Kind.NOTICE,
                    key=ev.key.encode(),
                    value=codec.encode_eviction(
                        seq=ev.key,
                        cause=ev.cause,
                        n=ev.n,
                        partition=ev.partition,
                        offset=ev.watermark,
                        model=self.model_id,
                        ts=now,
                        serialize=self.wire.serialize,
                    ),
                    partition=ev.partition,
                    offset=ev.watermark,
                    source_timestamp_ms=int(now * 1000),
                )
            )
        return out

    def _step(
        self,
        steps: list[_Step],
        records: Sequence[InputRecord],
        outputs: list[OutputRecord | None],
    ) -> None:
        xs = np.asarray([s.x for s in steps], dtype=np.float32)
        before = [s.state.tensors for s in steps]
        started = time.perf_counter()
        ys = self.engine.step([s.state for s in steps], xs)
        per_event = (time.perf_counter() - started) / len(steps)
        now = self.clock()
        # One NumPy call each for the whole wave, not one per row.
        finite = np.isfinite(ys).reshape(len(steps), -1).all(axis=1).tolist()
        rows = ys.tolist()
        for s, y, ok, previous in zip(steps, rows, finite, before, strict=True):
            self._inference.observe(per_event)
            rec = records[s.index]
            state = s.state
            state.watermark = s.offset
            if not ok:
                # Its x is refused: the tensors stay as they were, so one bad step
                # cannot poison every later prediction of the sequence. Its markers
                # are not: `start` has reset already, `end` resets now and its step
                # counts as seen, as the plan of this batch already assumed.
                state.tensors = previous
                error = RecordRejected(codec.NONFINITE_OUTPUT, "the model produced a non-finite output")
                outputs[s.index] = self._dead_letter(rec, error)
                if s.event.end:
                    self._reset(state, s.offset, "end")
                continue
            if state.n == 0:
                state.first_offset = s.offset
            state.n += 1
            if not state.exact or (self.publish_from_ms is not None and rec.timestamp < self.publish_from_ms):
                self.metrics.withheld.inc()
            else:
                if self.ys is not None:
                    self.ys[s.partition, s.offset] = y
                outputs[s.index] = OutputRecord(
                    kind=Kind.PREDICTION,
                    key=rec.key,
                    value=codec.encode_prediction(
                        seq=s.event.key,
                        y=y,
                        n=state.n,
                        end=s.event.end,
                        partition=s.partition,
                        offset=s.offset,
                        model=self.model_id,
                        ts=now,
                        step=s.event.step,
                        serialize=self.wire.serialize,
                    ),
                    partition=s.partition,
                    offset=s.offset,
                    source_timestamp_ms=rec.timestamp,
                )
            if s.event.end:
                self._reset(state, s.offset, "end")

    def _dead_letter(self, rec: InputRecord, error: RecordRejected) -> OutputRecord:
        self.metrics.rejected.labels(reason=error.reason).inc()
        headers = codec.dlq_headers(error, rec.topic, rec.partition, rec.offset)
        return dead_letter(rec, headers, max(codec.DEAD_LETTER_VALUE_BYTES, self.max_record_bytes))
