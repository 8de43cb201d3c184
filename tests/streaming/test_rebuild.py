"""Model change and warm start without a broker: the rebuild's plan, its per-key
replay through the processor (equal to what the new model builds live), its
bounds, the Rebuilder over a fake input partition, the run loop's order (the
rebuilt states checkpointed before the partition serves), the publish cutoff,
and their configuration. The same paths run against the real broker in
tests/broker/test_model_change.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from kafka.errors import KafkaTimeoutError

from daemon.config import Settings, load_settings
from daemon.core.processor import Processor
from daemon.core.state import SavedState, SequenceState, StateStore
from daemon.errors import ConfigError
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord as Rec
from daemon.streaming import rebuild
from daemon.streaming.lifecycle import Phase
from daemon.streaming.loop import RunLoop
from daemon.streaming.rebuild import Plan, Rebuilder, Recompute, Span, plan, rebuild_processor, stale
from tests.support.backends import Memory, ported
from tests.support.fakes import (
    ScaledSumEngine,
    recs,
    settings,
)
from tests.support.kafka import MemoryConsumer, MemoryKafka

A, B = "m@aaaa", "m@bbbb"


def processor(model_id: str, scale: float, **kwargs: Any) -> Processor:
    return Processor(
        ScaledSumEngine(scale),
        model_id=model_id,
        n_features=1,
        store=StateStore(),
        metrics=Metrics(),
        **kwargs,
    )


def saved(proc: Processor, partition: int = 0) -> dict[str, SavedState]:
    """The partition's states as a restore reads them back: the records a checkpoint wrote."""
    return {
        key: SequenceState.from_snapshot(value)
        for p, key, value in proc.store.take_changes(proc.model_id)
        if p == partition and value is not None
    }


def described(state: SequenceState) -> tuple[Any, ...]:
    tensors = None if state.tensors is None else [t.tolist() for t in state.tensors]
    return (tensors, state.n, state.watermark, state.first_offset, state.last_step)


# Every processor rule on the way: markers, starts, `step` duplicates and gaps, bad
# input (dead-lettered), a key reused after its end, other keys interleaved.
EVENTS: list[tuple[str, dict[str, object]]] = [
    ("a", {"x": [1.0], "step": 0}),  # 0
    ("b", {"x": [2.0], "step": 0}),  # 1
    ("a", {"x": [3.0], "step": 1, "end": True}),  # 2: a's first segment ends
    ("c", {"x": [5.0]}),  # 3
    ("a", {"x": [4.0], "step": 0}),  # 4: a's open segment starts here
    ("b", {"x": [6.0], "step": 1}),  # 5
    ("b", {"x": [7.0], "step": 1}),  # 6: a duplicate step
    ("a", {"x": "bad"}),  # 7: dead-lettered
    ("b", {"x": [8.0], "step": 4}),  # 8: a gap
    ("c", {"end": True}),  # 9: c ends (a pure marker)
    ("d", {"x": [9.0], "step": 0}),  # 10
    ("b", {"x": [1.5], "start": True, "step": 0}),  # 11: b starts over here
    ("a", {"x": [2.5], "step": 1}),  # 12
    ("d", {"x": [0.5], "step": 1}),  # 13
    ("b", {"x": [3.5], "step": 1}),  # 14
]


def test_the_rebuilt_states_equal_what_the_new_model_builds_live() -> None:
    records = recs(EVENTS)
    old = processor(A, 1.0)
    old.process(records)
    restored = saved(old)
    live = processor(B, 2.0)
    live.process(records)

    todo = stale(restored, B)
    assert sorted(todo) == ["a", "b", "d"]  # c ended: a reset record, nothing to rebuild
    p = plan(0, todo, beginning=0, budget=100)
    assert (p.start, p.end, p.dropped) == (4, 15, [])
    assert p.spans == {b"a": Span(4, 12), b"b": Span(11, 14), b"d": Span(10, 13)}
    replay = Recompute(p, todo, rebuild_processor(live))
    for i in range(0, 15, 4):  # in slices, as polls bring them
        replay.feed(records[i : i + 4])
    done = replay.finish(restored)

    assert done.evictions == [] and done.rebuilt == 3 and done.changed == ["a", "b", "d"]
    # Records read: offsets 4..14; replayed: a 4, 7, 12; b 11, 14; d 10, 13 (a's bad
    # record is dead-lettered again, silently).
    assert (done.read, done.replayed) == (11, 7)
    for key in "abd":
        state, saved_by = done.states[key]
        assert saved_by == B
        assert described(state) == described(live.store.get(0, key)), key
    assert done.states["c"] == restored["c"]  # untouched: adopt installs it as before
    # The old model's tensors were not kept: B's are twice A's here.
    assert done.states["a"][0].tensors is not None and done.states["a"][0].tensors[0].tolist() == [13.0]


def test_the_replay_publishes_nothing_and_counts_nothing_live() -> None:
    live = processor(B, 2.0)
    replayer = rebuild_processor(live)
    # No prediction is even encoded; its dead letters the rebuild drops.
    assert [o.kind.value for o in replayer.process(recs(EVENTS))] == ["dead_letter"]
    assert cast(Metrics, live.metrics).registry.get_sample_value("lstmd_events_consumed_total") == 0
    assert replayer.engine is live.engine and replayer.store is not live.store


def states(**spans: tuple[int, int]) -> dict[str, SequenceState]:
    return {k: SequenceState(n=5, first_offset=f, watermark=w, last_step=3) for k, (f, w) in spans.items()}


def test_a_sequence_whose_first_input_is_gone_is_dropped_as_history_expired() -> None:
    p = plan(2, states(old=(10, 90), new=(50, 95), lost=(-1, 80)), beginning=40, budget=1000)
    assert [(e.key, e.cause, e.n, e.watermark) for e in p.dropped] == [
        ("lost", "history_expired", 5, 80),
        ("old", "history_expired", 5, 90),
    ]
    assert (p.start, p.end, list(p.spans)) == (50, 96, [b"new"])
    # A watermark at or past the partition's end: its inputs are not there (a topic
    # recreated); the read would never reach it.
    recreated = plan(2, states(new=(50, 95), gone=(60, 120)), beginning=0, budget=1000, end_offset=100)
    assert [(e.key, e.cause) for e in recreated.dropped] == [("gone", "history_expired")]
    assert (recreated.start, recreated.end) == (50, 96)


def test_the_budget_drops_the_oldest_sequences() -> None:
    p = plan(0, states(a=(0, 99), b=(50, 60), c=(61, 99), d=(80, 98)), beginning=0, budget=40)
    # The read ends after offset 99; 40 records back is offset 60: a and b began before.
    assert [(e.key, e.cause) for e in p.dropped] == [("a", "rebuild_budget"), ("b", "rebuild_budget")]
    assert (p.start, p.end, sorted(p.spans)) == (61, 100, [b"c", b"d"])
    assert p.end - p.start <= 40
    nothing = plan(0, states(a=(0, 99)), beginning=0, budget=10)
    assert nothing == Plan(0, {}, 0, 0, nothing.dropped) and nothing.dropped[0].cause == "rebuild_budget"


def test_a_first_input_deleted_during_the_read_loses_the_sequence() -> None:
    records = recs(EVENTS)
    old = processor(A, 1.0)
    old.process(records)
    restored = saved(old)
    todo = stale(restored, B)
    replay = Recompute(plan(0, todo, 0, 100), todo, rebuild_processor(processor(B, 2.0)))
    replay.feed([r for r in records if r.offset != 4])  # a's first input, gone
    done = replay.finish(restored)
    assert [(e.key, e.cause, e.watermark) for e in done.evictions] == [("a", "history_expired", 12)]
    # Dropped: a reset state keeping the watermark (its inputs are never answered twice).
    state, saved_by = done.states["a"]
    assert (state.n, state.tensors, state.watermark, state.last_step, saved_by) == (0, None, 12, 1, B)


def input_partition(records: list[Rec]) -> tuple[MemoryKafka, MemoryConsumer]:
    """An in-memory input partition holding `records`, and a reader of it."""
    kafka = MemoryKafka()
    kafka.create_topic("in", 2)
    for r in records:
        kafka.produce("in", r.key, r.value, 0)
    return kafka, kafka.reader()


def rebuilder(tmp_path: Path, reader: MemoryConsumer, live: Processor, **extra: Any) -> Rebuilder:
    return Rebuilder(lambda: ported(reader), settings(tmp_path, **extra), Metrics(), live)


def test_the_rebuilder_reads_the_input_partition_in_slices(tmp_path: Path) -> None:
    records = recs(EVENTS * 20)  # 300 records, three polls of at least 100
    old = processor(A, 1.0)
    old.process(records)
    restored = saved(old)
    live = processor(B, 2.0)
    live.process(records)
    kafka, reader = input_partition(records)
    kafka.faults.offsets.append(KafkaTimeoutError("no leader"))
    r = rebuilder(tmp_path, reader, live)
    assert r.begin(0, restored) is True
    assert r.step() == []  # the first offset not known yet: asked again
    done = []
    for _ in range(20):
        done += r.step()
        if done:
            break
    assert [d.partition for d in done] == [0] and not r.active
    for key in "abd":
        assert described(done[0].states[key][0]) == described(live.store.get(0, key))
    sample = r.metrics.registry.get_sample_value
    assert sample("lstmd_sequences_rebuilt_total") == 3
    assert sample("lstmd_rebuild_events_replayed_total") == done[0].replayed
    assert reader.assignment() == set()  # released once done
    # Nothing saved under another model: no rebuild.
    assert r.begin(1, saved(live)) is False and 1 not in r.active


def test_a_rebuild_cancelled_mid_way_is_forgotten(tmp_path: Path) -> None:
    records = recs(EVENTS * 40)
    old = processor(A, 1.0)
    old.process(records)
    _, reader = input_partition(records)
    r = rebuilder(tmp_path, reader, processor(B, 2.0))
    r.begin(0, saved(old))
    r.reads.locate()
    reader.poll(max_records=100)  # a first poll's worth read
    r.cancel([0])
    assert not r.active and reader.assignment() == set()
    assert r.step() == []


# -- the run loop around a rebuild, on the in-memory Kafka ----------------------------
def served_by_a(
    tmp_path: Path, events: list[tuple[str, dict[str, object]]], **extra: Any
) -> tuple[Memory, Settings]:
    """The input topic holds `events`; model A answered them all and checkpointed its
    states; then it stopped."""
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0, **extra)
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in events])
    old = processor(A, 1.0)
    loop = kafka.loop(s, old, cast(Metrics, old.metrics))
    consumed = "lstmd_events_consumed_total"
    kafka.run_until([loop], lambda: old.metrics.registry.get_sample_value(consumed) == len(events))  # type: ignore[attr-defined]
    loop.stop.set()
    while loop.step():
        pass
    loop.close()
    return kafka, s


def written_by_b(kafka: Memory, s: Settings, since: int) -> list[tuple[int, str]]:
    """(watermark, model) of the state records written after the first `since`."""
    return sorted(
        (st.watermark, model)
        for value in kafka.values(s.state_topic)[since:]
        if value
        for st, model in [SequenceState.from_snapshot(value)]
    )


def slow_rebuild(monkeypatch: pytest.MonkeyPatch, kafka: Memory) -> None:
    """Each step of a rebuild reads about two polls of 100 records."""
    monkeypatch.setattr(rebuild, "RESTORE_SLICE_S", 0.05)
    monkeypatch.setattr(rebuild, "MIN_POLL_RECORDS", 100)
    monkeypatch.setattr(rebuild, "MAX_POLL_RECORDS", 100)
    kafka.kafka.read_delay_s = 0.03


def test_the_run_loop_checkpoints_the_rebuilt_states_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka, s = served_by_a(tmp_path, EVENTS * 40)  # 600 records
    states_before = len(kafka.values(s.state_topic))
    outputs_before = len(kafka.values(s.output_topic))
    slow_rebuild(monkeypatch, kafka)
    live = processor(B, 2.0)
    loop = kafka.loop(s, live, cast(Metrics, live.metrics))
    loop.health.model_loaded = True
    kafka.run_until([loop], lambda: loop.partitions.phase(0) is Phase.REBUILDING)
    assert loop.health.ready() == (False, "rebuilding partitions [0] for the new model")
    assert len(live.store) == 0  # nothing of the partition installed while it rebuilds
    kafka.run_until([loop], lambda: loop.partitions.phase(0) is Phase.ACTIVE)
    assert loop.health.ready() == (True, "ok")
    expected = processor(B, 2.0)  # what B builds live from the same inputs
    expected.process(recs(EVENTS * 40))
    # a, b and d rewritten under B before the partition serves; nothing published.
    assert written_by_b(kafka, s, states_before) == sorted(
        (expected.store.get(0, k).watermark, B) for k in "abd"
    )
    assert len(kafka.values(s.output_topic)) == outputs_before
    for key in "abd":
        assert described(live.store.get(0, key)) == described(expected.store.get(0, key))


def mid_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Memory, Settings, RunLoop, int]:
    """Model B's run loop with partition 0 rebuilding, part of its history read; and
    how many state records there were before it."""
    kafka, s = served_by_a(tmp_path, EVENTS * 40)
    before = len(kafka.values(s.state_topic))
    slow_rebuild(monkeypatch, kafka)
    live = processor(B, 2.0)
    loop = kafka.loop(s, live, cast(Metrics, live.metrics))
    kafka.run_until([loop], lambda: 0 in loop.clients.rebuilder.active)
    loop.step()
    recompute = loop.clients.rebuilder.active[0].recompute
    assert recompute is not None and 0 < recompute.read < 600  # under way
    return kafka, s, loop, before


def test_a_partition_revoked_mid_rebuild_writes_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka, s, loop, before = mid_rebuild(tmp_path, monkeypatch)
    other = kafka.kafka.consumer(s.group_id)  # another member joins and takes partition 0
    other.subscribe([s.input_topic])
    kafka.kafka.group(s.group_id).members.reverse()  # the round robin gives it partition 0
    loop.step()
    assert not loop.clients.rebuilder.active and loop.partitions.phase(0) is None
    assert len(loop.store) == 0
    for _ in range(3):
        loop.step()
    # Nothing of the partition is written: its next owner restores the old model's
    # states and rebuilds again.
    assert len(kafka.values(s.state_topic)) == before and written_by_b(kafka, s, before) == []


def test_sigterm_mid_rebuild_stops_without_writing_any_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka, s, loop, before = mid_rebuild(tmp_path, monkeypatch)
    recompute = loop.clients.rebuilder.active[0].recompute
    assert recompute is not None
    read = recompute.read
    loop.stop.set()
    assert loop.step() is False  # the final checkpoint: nothing pending
    assert recompute.read == read and len(loop.store) == 0  # not read on, not installed
    assert len(kafka.values(s.state_topic)) == before
    assert loop.partitions.phase(0) is Phase.REBUILDING  # never served, never written


def test_reset_keeps_announcing_model_changed(tmp_path: Path) -> None:
    kafka, s = served_by_a(tmp_path, EVENTS, on_model_change="reset")
    outputs_before = len(kafka.values(s.output_topic))
    live = processor(B, 2.0)
    loop = kafka.loop(s, live, cast(Metrics, live.metrics))
    kafka.run_until([loop], lambda: loop.partitions.phase(0) is Phase.ACTIVE)
    loop.step()
    notices = [orjson.loads(v or b"") for v in kafka.values(s.output_topic)[outputs_before:]]
    assert sorted((n["seq"], n["cause"]) for n in notices) == [
        ("a", "model_changed"),
        ("b", "model_changed"),
        ("d", "model_changed"),
    ]


def test_inputs_before_the_cutoff_advance_the_states_and_publish_no_prediction() -> None:
    events = [
        ("a", {"x": [1.0]}),
        ("a", {"x": "bad"}),
        ("b", {"x": [2.0]}),
        ("a", {"x": [3.0]}),
        ("b", {"x": [4.0]}),
    ]
    timestamps = [1000, 1500, 1999, 2000, 2500]
    records = [
        Rec("in", 0, i, ts, k.encode(), orjson.dumps(v))
        for i, ((k, v), ts) in enumerate(zip(events, timestamps, strict=True))
    ]
    proc = processor(B, 1.0, publish_from_ms=2000)
    out = proc.process(records)
    # The dead letter is published whatever its time; predictions only from 2000 ms on,
    # and they include the history before it (n and y).
    assert [(o.kind.value, o.offset) for o in out] == [
        ("dead_letter", 1),
        ("prediction", 3),
        ("prediction", 4),
    ]
    values = [orjson.loads(o.value or b"") for o in out[1:]]
    assert [(v["seq"], v["n"], v["y"]) for v in values] == [("a", 2, [4.0]), ("b", 2, [6.0])]
    assert cast(Metrics, proc.metrics).registry.get_sample_value("lstmd_predictions_withheld_total") == 2


# -- configuration -----------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("LSTMD_"):
            monkeypatch.delenv(name)
    model = tmp_path / "m.keras"
    model.write_bytes(b"x")
    for k, v in {
        "LSTMD_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
        "LSTMD_INPUT_TOPIC": "in",
        "LSTMD_OUTPUT_TOPIC": "out",
        "LSTMD_GROUP_ID": "g",
        "LSTMD_MODEL_PATH": str(model),
    }.items():
        monkeypatch.setenv(k, v)
    return monkeypatch


def test_model_change_defaults(env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    # keras (the default engine) steps ~1 ms per event: a budget of about a minute
    assert (s.on_model_change, s.engine, s.rebuild_budget, s.publish_from_ms) == (
        "rebuild",
        "keras",
        50_000,
        None,
    )
    env.setenv("LSTMD_ENGINE", "fast")
    assert load_settings().rebuild_budget == 1_000_000
    env.setenv("LSTMD_REBUILD_MAX_EVENTS", "7")
    assert load_settings().rebuild_budget == 7


def test_publish_from_is_an_rfc_3339_time_with_a_zone(env: pytest.MonkeyPatch) -> None:
    env.setenv("LSTMD_PUBLISH_FROM", "2026-03-01T12:00:00.250+01:00")
    assert load_settings().publish_from_ms == 1772362800250


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LSTMD_PUBLISH_FROM", "2026-03-01T12:00:00"),  # no time zone
        ("LSTMD_PUBLISH_FROM", "yesterday"),
        ("LSTMD_ON_MODEL_CHANGE", "rebiuld"),
        ("LSTMD_REBUILD_MAX_EVENTS", "0"),
    ],
)
def test_a_bad_model_change_or_warm_start_value_is_named(
    env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    env.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith(f"{variable}: ") and repr(value) in lines[0]
