"""Model change and warm start without a broker: the rebuild's plan, its per-key
replay through the processor (equal to what the new model builds live), its
bounds, the Rebuilder over a fake input partition, the run loop's order (the
rebuilt states checkpointed before the partition serves), the publish cutoff,
and their configuration. The same paths run against the real broker in
tests/test_model_change.py."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from kafka import TopicPartition

from daemon.config import load_settings
from daemon.core.processor import Processor
from daemon.core.state import SequenceState, StateStore
from daemon.errors import ConfigError
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord as Rec
from daemon.streaming import rebuild
from daemon.streaming.lifecycle import Phase
from daemon.streaming.loop import Clients, RunLoop
from daemon.streaming.rebuild import Plan, Rebuilder, Recompute, Span, plan, rebuild_processor, stale
from tests.fakes import (
    FakeConsumer,
    FakeInputConsumer,
    FakeProducer,
    ScaledSumEngine,
    checkpointer,
    recs,
    settings,
)

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


def saved(proc: Processor, partition: int = 0) -> dict[str, tuple[SequenceState, str]]:
    """The partition's states as a restore reads them back: the records a checkpoint wrote."""
    return {
        key: SequenceState.restore(value)
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
    assert live.metrics.events_consumed._value.get() == 0  # type: ignore[attr-defined]
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


def rebuilder(tmp_path: Path, consumer: FakeInputConsumer, live: Processor, **extra: Any) -> Rebuilder:
    return Rebuilder(lambda: cast(Any, consumer), settings(tmp_path, **extra), Metrics(), live)


def test_the_rebuilder_reads_the_input_partition_in_slices(tmp_path: Path) -> None:
    records = recs(EVENTS * 20)  # 300 records, three polls of at least 100
    old = processor(A, 1.0)
    old.process(records)
    restored = saved(old)
    live = processor(B, 2.0)
    live.process(records)
    consumer = FakeInputConsumer(list(records), fail_beginnings=1)
    r = rebuilder(tmp_path, consumer, live)
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
    assert r.metrics.sequences_rebuilt._value.get() == 3  # type: ignore[attr-defined]
    assert r.metrics.events_replayed._value.get() == done[0].replayed  # type: ignore[attr-defined]
    assert consumer.assigned == []  # released once done
    # Nothing saved under another model: no rebuild.
    assert r.begin(1, saved(live)) is False and 1 not in r.active


def test_a_rebuild_cancelled_mid_way_is_forgotten(tmp_path: Path) -> None:
    records = recs(EVENTS * 40)
    old = processor(A, 1.0)
    old.process(records)
    consumer = FakeInputConsumer(list(records))
    r = rebuilder(tmp_path, consumer, processor(B, 2.0))
    r.begin(0, saved(old))
    r.reads.locate()
    consumer.poll(max_records=100)  # a first poll's worth read
    r.cancel([0])
    assert not r.active and consumer.assigned == []
    assert r.step() == []


def test_the_run_loop_checkpoints_the_rebuilt_states_before_serving(tmp_path: Path) -> None:
    records = recs(EVENTS)
    old = processor(A, 1.0)
    old.process(records)
    live = processor(B, 2.0)
    s = settings(tmp_path)
    health = Health(60)
    health.model_loaded = True
    loop = RunLoop(s, live, cast(Metrics, live.metrics), health, threading.Event())
    producer = FakeProducer()
    consumer = FakeInputConsumer(list(records))
    clients = Clients(
        consumer=cast(Any, FakeConsumer()),
        checkpointer=checkpointer(s, lambda: producer),
        restorer=cast(Any, None),
        rebuilder=rebuilder(tmp_path, consumer, live),
        listener=cast(Any, None),
    )
    loop.partitions.assign([0])
    loop.partitions.restore(0)
    loop._adopt(clients, 0, saved(old))
    assert loop.partitions.phase(0) is Phase.REBUILDING
    assert health.ready() == (False, "rebuilding partitions [0] for the new model")
    assert len(live.store) == 0  # nothing of the partition installed while it rebuilds
    for _ in range(10):
        loop._rebuild(clients)
        if loop.partitions.phase(0) is Phase.ACTIVE:
            break
    assert loop.partitions.phase(0) is Phase.ACTIVE and health.ready() == (True, "ok")
    written = sorted(
        (st.watermark, model)
        for t, v in producer.sent
        if t == s.state_topic_name and v
        for st, model in [SequenceState.restore(v)]
    )
    assert written == [(12, B), (13, B), (14, B)]  # a, b and d rewritten under B, nothing published
    assert [t for t, _ in producer.sent if t != s.state_topic_name] == []
    expected = processor(B, 2.0)
    expected.process(records)
    for key in "abd":
        assert described(live.store.get(0, key)) == described(expected.store.get(0, key))


@dataclass
class MidRebuild:
    """A run loop with partition 0 rebuilding, part of its history read."""

    loop: RunLoop
    clients: Clients
    live: Processor
    producer: FakeProducer
    consumer: FakeInputConsumer


def mid_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: FakeConsumer) -> MidRebuild:
    records = recs(EVENTS * 40)  # 600 records; a slice reads about two polls of 100
    monkeypatch.setattr(rebuild, "RESTORE_SLICE_S", 0.05)
    monkeypatch.setattr(rebuild, "MAX_POLL_RECORDS", 100)
    old = processor(A, 1.0)
    old.process(records)
    live = processor(B, 2.0)
    s = settings(tmp_path)
    loop = RunLoop(s, live, cast(Metrics, live.metrics), Health(60), threading.Event())
    producer = FakeProducer()
    consumer = FakeInputConsumer(list(records), poll_s=0.03)
    clients = Clients(
        consumer=cast(Any, group),
        checkpointer=checkpointer(s, lambda: producer),
        restorer=cast(Any, type("R", (), {"cancel": lambda self, ps: None})()),
        rebuilder=rebuilder(tmp_path, consumer, live),
        listener=cast(Any, None),
    )
    loop.partitions.assign([0])
    loop.partitions.restore(0)
    loop._adopt(clients, 0, saved(old))
    loop._rebuild(clients)
    replay = clients.rebuilder.active[0].recompute
    assert replay is not None and 0 < replay.read < 600  # under way
    return MidRebuild(loop, clients, live, producer, consumer)


def test_a_partition_revoked_mid_rebuild_writes_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = mid_rebuild(tmp_path, monkeypatch, FakeConsumer())
    r.loop._release(TopicPartition("in", 0), r.clients, "revoked")
    assert not r.clients.rebuilder.active and r.consumer.assigned == []
    assert r.loop.partitions.phase(0) is None and len(r.live.store) == 0
    r.loop._flush(r.clients)
    r.loop._rebuild(r.clients)
    # Nothing of the partition is written: its next owner restores the old model's
    # states and rebuilds again.
    assert r.producer.sent == []


class PausingConsumer(FakeConsumer):
    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("in", 0)}

    def pause(self, *tps: TopicPartition) -> None: ...


def test_sigterm_mid_rebuild_stops_without_writing_any_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = mid_rebuild(tmp_path, monkeypatch, PausingConsumer())
    polls = r.consumer.polls
    r.loop.stop.set()
    assert not r.loop._shutdown_step(r.clients)  # the final checkpoint: nothing pending
    assert r.consumer.polls == polls and r.producer.sent == [] and len(r.live.store) == 0
    assert r.loop.partitions.phase(0) is Phase.REBUILDING  # never served, never written


def test_reset_keeps_announcing_model_changed(tmp_path: Path) -> None:
    old = processor(A, 1.0)
    old.process(recs(EVENTS))
    live = processor(B, 2.0)
    s = settings(tmp_path, on_model_change="reset")
    loop = RunLoop(s, live, cast(Metrics, live.metrics), Health(60), threading.Event())
    clients = cast(Clients, type("C", (), {"rebuilder": rebuilder(tmp_path, FakeInputConsumer([]), live)})())
    loop.partitions.assign([0])
    loop.partitions.restore(0)
    loop._adopt(clients, 0, saved(old))
    assert loop.partitions.phase(0) is Phase.ACTIVE
    causes = sorted(
        (orjson.loads(n.value or b"")["seq"], orjson.loads(n.value or b"")["cause"])
        for n in loop.policy.notices
    )
    assert causes == [("a", "model_changed"), ("b", "model_changed"), ("d", "model_changed")]


# -- warm start ------------------------------------------------------------------


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
    assert proc.metrics.withheld._value.get() == 2  # type: ignore[attr-defined]


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
