"""A new model promoted while the loop runs, on the in-memory Kafka: the candidate
followed in the background, the switch between two batches (every prediction before
it the old model's, every one after it the new model's on the whole prefix, none
missing or repeated, the partition ready throughout), the switch checkpointed, a
crash mid-swap finished exactly by the next owner without a rebuild, a shadow
promoted, and the model file's watch. The real broker: tests/broker/test_model_swap.py."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import orjson
import pytest

from daemon.config import Settings
from daemon.core.state import parse_state_key
from daemon.errors import UnservableModelError
from daemon.ops.metrics import Metrics
from daemon.streaming import promote
from daemon.streaming.lifecycle import Phase
from daemon.streaming.promote import Loaded, ModelFile, Refused, Reverted
from tests.streaming.test_shadow import A, B, consumed, events, expected, processor, run_loop, shut
from tests.support.backends import Memory, unported


def feed(kafka: Memory, s: Settings, evs: list[tuple[str, dict[str, object]]]) -> None:
    kafka.produce(s.input_topic, [(k.encode(), orjson.dumps(v), 0) for k, v in evs])


def answers(kafka: Memory, s: Settings) -> list[tuple[int, str, list[float]]]:
    """(offset, model, y) of each prediction on the output topic, in order."""
    out = []
    for value in kafka.values(s.output_topic):
        doc = orjson.loads(value or b"")
        if doc.get("y") is not None:
            out.append((int(doc["offset"]), str(doc["model"]), list(doc["y"])))
    return out


def check_swap(kafka: Memory, s: Settings, evs: list[tuple[str, dict[str, object]]]) -> int:
    """Every input answered once; A's answers, then from one offset on B's on the whole
    prefix. Returns the offset of B's first answer."""
    out = answers(kafka, s)
    assert sorted(offset for offset, _, _ in out) == list(range(len(evs)))  # none missing or repeated
    by_a = {offset: y for offset, model, y in out if model == A}
    by_b = {offset: y for offset, model, y in out if model == B}
    switch = min(by_b)
    assert by_a and max(by_a) < switch
    want_a, want_b = expected(A, 1.0, evs), expected(B, 2.0, evs)
    assert by_a == {o: want_a[o] for o in by_a}
    assert by_b == {o: want_b[o] for o in by_b}
    return switch


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_model_promoted_under_a_steady_stream_switches_between_two_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delivery: str
) -> None:
    monkeypatch.setattr("daemon.streaming.follow.FOLLOW_SLICE_S", 0.05)
    monkeypatch.setattr("daemon.streaming.follow.MAX_POLL_RECORDS", 20)
    monkeypatch.setattr("daemon.streaming.follow.MIN_POLL_RECORDS", 20)
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0, delivery=delivery)
    evs = events(1000, end_every=60)
    loop = run_loop(kafka, s)
    feed(kafka, s, evs[:300])
    kafka.run_until([loop], lambda: consumed(loop) == 300)
    kafka.kafka.read_delay_s = 0.03
    loop.promotion.take([Loaded(processor(B, 2.0, Metrics.discarding()), 0.0)])
    for i in range(300, 1000, 10):  # 10 inputs a step while B builds, then switches
        feed(kafka, s, evs[i : i + 10])
        loop.step()
        assert loop.health.ready() == (True, "ok")
    kafka.kafka.read_delay_s = 0
    kafka.run_until([loop], lambda: consumed(loop) == 1000)
    assert loop.processor.model_id == B and not loop.followers
    shut(loop)
    switch = check_swap(kafka, s, evs)
    assert 300 < switch < 1000  # B built while A answered, then took over
    m = loop.metrics.registry
    assert m.get_sample_value("lstmd_model_swaps_total", {"outcome": "promoted"}) == 1
    # The switch's checkpoint: B's states under the serving keys, the candidate's deleted.
    newest = {r.key: r.value for r in kafka.kafka.records(s.state_topic)}
    assert {parse_state_key(k).owner for k, v in newest.items() if v is not None} == {None}
    # The next owner serves B without rebuilding and goes on exactly.
    again = run_loop(kafka, s, model=B, scale=2.0)
    more = events(1100, end_every=60)
    feed(kafka, s, more[1000:])
    kafka.run_until([again], lambda: consumed(again) == 100)
    assert again.partitions.phase(0) is Phase.ACTIVE and not again.clients.rebuilder.active
    shut(again)
    check_swap(kafka, s, more)


def test_a_crash_after_the_candidate_followed_is_finished_by_the_next_owner_without_a_rebuild(
    tmp_path: Path,
) -> None:
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0)
    evs = events(400, end_every=60)
    loop = run_loop(kafka, s)
    feed(kafka, s, evs[:200])
    kafka.run_until([loop], lambda: consumed(loop) == 200)
    loop.promotion.ready = lambda: False  # type: ignore[method-assign]  # crashes before the switch
    loop.promotion.take([Loaded(processor(B, 2.0, Metrics.discarding()), 0.0)])
    candidate = loop.promotion.candidate
    assert candidate is not None
    kafka.run_until([loop], lambda: candidate.following(0))
    feed(kafka, s, evs[200:250])  # answered by A, B following; checkpointed together
    committed = kafka.kafka.group(s.group_id).committed
    kafka.run_until([loop], lambda: consumed(loop) == 250 and 250 in committed.values())
    unported(loop.clients.consumer).leave()  # kill -9: never heard of again
    # The pod restarts with the new file: B serves, from the candidate's states.
    again = run_loop(kafka, s, model=B, scale=2.0)
    feed(kafka, s, evs[250:])
    kafka.run_until([again], lambda: consumed(again) == 150)
    assert not again.clients.rebuilder.active and again.partitions.phase(0) is Phase.ACTIVE
    shut(again)
    assert check_swap(kafka, s, evs) == 250


def test_a_shadow_promoted_switches_as_soon_as_it_follows(tmp_path: Path) -> None:
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0, shadow_model_path=tmp_path / "m.keras")
    evs = events(300, end_every=60)
    loop = run_loop(kafka, s, shadow=True)
    feed(kafka, s, evs[:100])
    kafka.run_until([loop], lambda: consumed(loop) == 100 and loop.followers.all[0].following(0))
    loop.promotion.take([Loaded(processor(B, 2.0, Metrics.discarding()), 0.0)])
    feed(kafka, s, evs[100:])
    kafka.run_until([loop], lambda: consumed(loop) == 300)
    shut(loop)
    assert check_swap(kafka, s, evs) == 100  # the very next batch
    assert not loop.followers and loop.processor.ys is None


def test_the_model_file_watch_loads_a_changed_file_once_it_settles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(promote, "SETTLE_S", 0.05)
    path = tmp_path / "m.keras"
    path.write_bytes(b"model A")
    serving = hashlib.sha256(b"model A").hexdigest()[:12]
    loads: list[bytes] = []

    def load(p: Path) -> object:
        data = p.read_bytes()
        loads.append(data)
        if data == b"broken":
            raise UnservableModelError("not a model")
        return processor(f"m@{hashlib.sha256(data).hexdigest()[:12]}", 2.0)

    watch = ModelFile(path, 0.02, load, serving)  # type: ignore[arg-type]
    watch.start()
    try:

        def wait_for(n: int) -> list[object]:
            deadline = time.monotonic() + 5
            found: list[object] = []
            while len(found) < n and time.monotonic() < deadline:
                found += watch.take()
                time.sleep(0.01)
            return found

        path.write_bytes(b"model B")
        (event,) = wait_for(1)
        assert isinstance(event, Loaded) and loads == [b"model B"]
        path.write_bytes(b"broken")
        (event,) = wait_for(1)
        assert isinstance(event, Refused) and "not a model" in event.error
        path.write_bytes(b"model A")  # back to the serving model: no load
        (event,) = wait_for(1)
        assert isinstance(event, Reverted) and loads == [b"model B", b"broken"]
        time.sleep(0.2)
        assert watch.take() == []  # unchanged: nothing more
    finally:
        watch.stop()


def test_a_new_model_that_does_not_fit_is_refused_and_the_serving_one_goes_on(tmp_path: Path) -> None:
    kafka = Memory()
    s = kafka.settings(tmp_path, checkpoint_interval_ms=0)
    loop = run_loop(kafka, s)
    loop.startup.state_record_limit = 2000  # the state topic's max.message.bytes, as start-up read it
    big = processor(B, 2.0, Metrics.discarding())
    big.state_shapes = [(1, 1000)]  # 4 kB of state per sequence
    other = processor("m@cccc", 2.0, Metrics.discarding())
    other.n_features = 3
    loop.promotion.take([Loaded(big, 0.0), Loaded(other, 0.0), Refused(tmp_path / "m.keras", "not a model")])
    assert loop.promotion.candidate is None and not loop.followers
    refused = loop.metrics.registry.get_sample_value("lstmd_model_swaps_total", {"outcome": "refused"})
    assert refused == 3
    small = processor(B, 2.0, Metrics.discarding())
    small.state_shapes = [(1, 8)]
    loop.promotion.take([Loaded(small, 0.0)])
    assert loop.promotion.candidate is not None
    shut(loop)
