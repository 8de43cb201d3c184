"""A shadow model beside the serving one, on the in-memory Kafka: its build (the open
sequences replayed while the partition serves), its predictions on the shadow topic
(equal to what the shadow model builds on the whole prefix), its states checkpointed
under keys of their own and restored, sequences it could not replay kept unpublished,
and the comparison metrics. The same paths run against the real broker in
tests/broker/test_model_swap.py."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.state import StateStore, parse_state_key, state_key
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.streaming import follow
from daemon.streaming.follow import Phase
from daemon.streaming.loop import RunLoop
from tests.support.backends import Memory, memory_backend
from tests.support.fakes import ScaledSumEngine, recs

A, B = "m@aaaa", "m@bbbb"


def processor(model_id: str, scale: float, metrics: Metrics | None = None) -> Processor:
    return Processor(
        ScaledSumEngine(scale),
        model_id=model_id,
        n_features=1,
        store=StateStore(),
        metrics=metrics or Metrics(),
    )


def events(n: int, keys: str = "abc", end_every: int = 7) -> list[tuple[str, dict[str, object]]]:
    """n inputs over `keys`, each key's sequence ending every `end_every` of its steps."""
    out: list[tuple[str, dict[str, object]]] = []
    steps = dict.fromkeys(keys, 0)
    for i in range(n):
        key = keys[i % len(keys)]
        steps[key] += 1
        out.append((key, {"x": [float(i % 5) - 1.5], "end": steps[key] % end_every == 0}))
    return out


def expected(model_id: str, scale: float, evs: list[tuple[str, dict[str, object]]]) -> dict[int, Any]:
    """offset -> y of the model applied to every input from the first (the oracle)."""
    proc = processor(model_id, scale)
    return {
        orjson.loads(o.value or b"")["offset"]: orjson.loads(o.value or b"")["y"]
        for o in proc.process(recs(evs))
        if not o.dead_letter
    }


def published(kafka: Memory, topic: str) -> dict[int, dict[str, Any]]:
    """offset -> output value of the predictions on `topic` (the last of a repeat)."""
    out = {}
    for value in kafka.values(topic):
        doc = orjson.loads(value or b"")
        if doc.get("y") is not None:
            out[doc["offset"]] = doc
    return out


def run_loop(
    kafka: Memory, s: Settings, *, model: str = A, scale: float = 1.0, shadow: bool = False
) -> RunLoop:
    """A started run loop serving `model` (B: the shadow's), with the shadow B or not."""
    if s.shadow_topic not in kafka.kafka.topics:
        kafka.kafka.create_topic(s.shadow_topic)
    serving = processor(model, scale)
    metrics = cast(Metrics, serving.metrics)
    loop = RunLoop(
        s,
        serving,
        metrics,
        Health(60),
        threading.Event(),
        shadow=processor(B, 2.0, Metrics.discarding()) if shadow else None,
    )
    loop.start(loop.startup.assemble(memory_backend(kafka.kafka, s)))
    loop.health.model_loaded = True
    return loop


def consumed(loop: RunLoop) -> float:
    value = loop.metrics.registry.get_sample_value("lstmd_events_consumed_total")
    return value or 0.0


def shut(loop: RunLoop) -> None:
    loop.stop.set()
    while loop.step():
        pass
    loop.close()


def test_a_shadow_from_the_start_publishes_the_shadow_models_predictions(tmp_path: Path) -> None:
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0, shadow_model_path=tmp_path / "m.keras")
    evs = events(90)
    loop = run_loop(kafka, s, shadow=True)
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs[:30]])
    kafka.run_until([loop], lambda: loop.followers.all[0].following(0) and consumed(loop) == 30)
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs[30:]])
    kafka.run_until([loop], lambda: consumed(loop) == 90)
    shut(loop)
    serving = published(kafka, s.output_topic)
    shadow = published(kafka, s.shadow_topic)
    assert {o: d["y"] for o, d in serving.items()} == expected(A, 1.0, evs)
    want = expected(B, 2.0, evs)
    assert shadow and {o: d["y"] for o, d in shadow.items()} == {o: want[o] for o in shadow}
    assert min(shadow) <= 30 and set(range(30, 90)) <= set(shadow)  # every one after it followed
    assert all(d["model"] == B for d in shadow.values())
    m = loop.metrics.registry
    compared = m.get_sample_value("lstmd_shadow_compared_total", {"within_tolerance": "false"})
    nonzero = sum(1 for o in shadow if want[o] != [0.0])
    assert compared == nonzero  # the shadow's y is twice the serving one's: beyond 1e-3 unless 0
    assert m.get_sample_value("lstmd_shadow_predictions_total") == len(shadow)


def test_a_shadow_added_to_a_serving_partition_replays_its_open_sequences_while_it_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0, shadow_model_path=tmp_path / "m.keras")
    evs = events(600, end_every=50)  # at 400 each key's sequence has been open ~100 inputs
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs[:400]])
    first = run_loop(kafka, s)  # model A alone answers 400 inputs
    kafka.run_until([first], lambda: consumed(first) == 400)
    shut(first)
    # Each step of the build reads about two polls of 20 records.
    monkeypatch.setattr(follow, "FOLLOW_SLICE_S", 0.05)
    monkeypatch.setattr(follow, "MIN_POLL_RECORDS", 20)
    monkeypatch.setattr(follow, "MAX_POLL_RECORDS", 20)
    kafka.kafka.read_delay_s = 0.03
    loop = run_loop(kafka, s, shadow=True)
    follower = loop.followers.all[0]
    # The partition serves while the shadow builds: inputs keep coming and are answered.
    kafka.run_until([loop], lambda: follower.phases.get(0) is Phase.BUILDING)
    for i in range(400, 600, 20):
        kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs[i : i + 20]])
        loop.step()
        assert loop.health.ready() == (True, "ok")
    kafka.kafka.read_delay_s = 0
    kafka.run_until([loop], lambda: consumed(loop) == 200 and follower.following(0))
    assert follower.phases[0] is Phase.FOLLOWING
    shut(loop)
    assert {o: d["y"] for o, d in published(kafka, s.output_topic).items()} == expected(A, 1.0, evs)
    shadow = published(kafka, s.shadow_topic)
    want = expected(B, 2.0, evs)
    assert shadow and {o: d["y"] for o, d in shadow.items()} == {o: want[o] for o in shadow}
    assert min(shadow) >= 400  # none of the inputs answered before it was added


def test_the_shadows_states_are_checkpointed_apart_and_restored_following(tmp_path: Path) -> None:
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0, shadow_model_path=tmp_path / "m.keras")
    evs = events(120)
    loop = run_loop(kafka, s, shadow=True)
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs[:60]])
    kafka.run_until([loop], lambda: consumed(loop) == 60 and loop.followers.all[0].following(0))
    shut(loop)
    owners = {parse_state_key(r.key).owner for r in kafka.kafka.records(s.state_topic)}
    assert owners == {None, "bbbb"}
    # The next owner: the shadow follows at once (its states and marker restored).
    again = run_loop(kafka, s, shadow=True)
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs[60:]])
    kafka.run_until([again], lambda: again.followers.all[0].following(0))
    assert again.followers.all[0].phases[0] is Phase.FOLLOWING
    kafka.run_until([again], lambda: consumed(again) == 60)
    shut(again)
    shadow = published(kafka, s.shadow_topic)
    want = expected(B, 2.0, evs)
    assert set(range(60, 120)) <= set(shadow)
    assert {o: d["y"] for o, d in shadow.items()} == {o: want[o] for o in shadow}
    # A daemon without the shadow deletes its records, and serves as before.
    last = run_loop(kafka, s)
    kafka.run_until([last], lambda: last.partitions.serving(0))
    shut(last)
    newest = {r.key: r.value for r in kafka.kafka.records(s.state_topic)}  # compacted
    assert {parse_state_key(key).owner for key, value in newest.items() if value is not None} == {None}


def test_a_sequence_the_build_cannot_replay_is_not_published_until_it_starts_over(
    tmp_path: Path,
) -> None:
    kafka = Memory()
    s = kafka.settings(
        tmp_path, checkpoint_interval_ms=0, shadow_model_path=tmp_path / "m.keras", rebuild_max_events=10
    )
    # "a" opens first and stays open; "b" opens late, within the budget.
    ended: tuple[str, dict[str, object]] = ("c", {"x": [0.0], "end": True})
    evs: list[tuple[str, dict[str, object]]] = [("a", {"x": [1.0]}), *[ended] * 30]
    evs += [("b", {"x": [1.0]}), ("a", {"x": [1.0]})]
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs])
    first = run_loop(kafka, s)
    kafka.run_until([first], lambda: consumed(first) == len(evs))
    shut(first)
    loop = run_loop(kafka, s, shadow=True)
    kafka.run_until([loop], lambda: loop.followers.all[0].following(0))
    store = loop.followers.all[0].processor.store
    assert [k for p, k, state in store if not state.exact] == ["a"]  # over the budget
    more: list[tuple[str, dict[str, object]]] = [
        ("a", {"x": [1.0]}),
        ("b", {"x": [1.0]}),
        ("a", {"x": [1.0], "end": True}),
        ("a", {"x": [1.0]}),  # a starts over: exact from here
    ]
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in more])
    kafka.run_until([loop], lambda: consumed(loop) == len(more))
    shut(loop)
    shadow = published(kafka, s.shadow_topic)
    n = len(evs)
    assert sorted(shadow) == [n + 1, n + 3]  # b's, then a's after its end; none of a before
    want = expected(B, 2.0, evs + more)
    assert [shadow[o]["y"] for o in sorted(shadow)] == [want[n + 1], want[n + 3]]


def test_a_shadow_forgets_ended_sequences_once_committed_as_the_serving_store_does(tmp_path: Path) -> None:
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0, shadow_model_path=tmp_path / "m.keras")
    loop = run_loop(kafka, s, shadow=True)
    evs = events(60, end_every=5)  # every key's last input ends its sequence
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs[:3]])
    kafka.run_until([loop], lambda: loop.followers.all[0].following(0))
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs[3:]])
    follower = loop.followers.all[0].processor.store
    kafka.run_until([loop], lambda: consumed(loop) == 60 and not loop.policy.pending())
    kafka.produce(s.input_topic, [(b"z", orjson.dumps({"x": [1.0]}), 0)])  # a commit past the ends
    kafka.run_until([loop], lambda: consumed(loop) == 61 and loop.processor.store.ended() == 0)
    assert follower.ended() == 0  # forgotten too, not kept for good
    shut(loop)
    newest = {r.key: r.value for r in kafka.kafka.records(s.state_topic)}
    shadow_keys = [k for k, v in newest.items() if parse_state_key(k).owner == "bbbb" and v is not None]
    assert sorted(parse_state_key(k).key for k in shadow_keys) == ["", "z"]  # the marker and z's state


def test_a_shadow_state_that_cannot_be_read_is_not_published_until_its_sequence_starts_over(
    tmp_path: Path,
) -> None:
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0, shadow_model_path=tmp_path / "m.keras")
    loop = run_loop(kafka, s, shadow=True)
    kafka.produce(
        s.input_topic, [(b"a", orjson.dumps({"x": [1.0]}), 0), (b"b", orjson.dumps({"x": [1.0]}), 0)]
    )
    kafka.run_until([loop], lambda: loop.followers.all[0].following(0) and consumed(loop) == 2)
    shut(loop)
    # The shadow's record of "a" is damaged (its following marker stays).
    kafka.kafka.produce(s.state_topic, state_key("a", "bbbb"), b"not a snapshot", 0)
    again = run_loop(kafka, s, shadow=True)
    more: list[tuple[str, dict[str, object]]] = [
        ("a", {"x": [1.0]}),
        ("b", {"x": [1.0]}),
        ("a", {"x": [1.0], "end": True}),
        ("a", {"x": [2.0]}),
    ]
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in more])
    kafka.run_until([again], lambda: consumed(again) == 4)
    shut(again)
    evs: list[tuple[str, dict[str, object]]] = [("a", {"x": [1.0]}), ("b", {"x": [1.0]}), *more]
    shadow = published(kafka, s.shadow_topic)
    # b's, and a's after its end; none of a's inputs continuing the damaged state.
    assert sorted(o for o in shadow if o >= 2) == [3, 5]
    want = expected(B, 2.0, evs)
    assert [shadow[o]["y"] for o in (3, 5)] == [want[3], want[5]]
