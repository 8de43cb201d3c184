"""State snapshots and the store's bookkeeping: watermarks, changes, eviction."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.core.state import SequenceState, SnapshotError, StateStore, snapshot_bytes


def test_snapshot_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    tensors = [rng.normal(size=8).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    state = SequenceState(tensors=tensors, n=7, watermark=41, first_offset=30, last_step=6)
    back, model = SequenceState.from_snapshot(state.snapshot("m@abc"))
    assert model == "m@abc"
    assert (back.n, back.watermark, back.first_offset, back.last_step) == (7, 41, 30, 6)
    assert back.tensors is not None
    for a, b in zip(back.tensors, tensors, strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)


def test_reset_record_keeps_the_watermark() -> None:
    back, _ = SequenceState.from_snapshot(SequenceState(watermark=9).snapshot("m"))
    assert back.tensors is None and back.n == 0 and back.watermark == 9


@pytest.mark.parametrize("raw", [b"", b"LSTMD1", b"LSTMD1\x05\x00\x00\x00{bad}", b"XX" * 10])
def test_corrupt_snapshots_are_refused(raw: bytes) -> None:
    with pytest.raises(SnapshotError):
        SequenceState.from_snapshot(raw)


def test_changes_and_ended_watermarks() -> None:
    store = StateStore()
    a = store.get(0, "a")
    a.tensors, a.n, a.watermark = [np.ones(2, np.float32)], 1, 5
    store.mark_changed(0, "a")
    changes = store.take_changes("m")
    assert [(p, k) for p, k, _ in changes] == [(0, "a")]
    assert store.take_changes("m") == []
    store.end(0, "a")
    assert len(store) == 0 and store.watermark(0, "a") == 5
    ((_, key, raw),) = store.take_changes("m")
    restored, _ = SequenceState.from_snapshot(raw or b"")
    assert key == "a" and restored.n == 0 and restored.watermark == 5
    assert store.forget_ended_before(0, 5) == []  # offset 5 itself not yet committed
    assert store.forget_ended_before(0, 6) == ["a"]
    assert store.watermark(0, "a") == -1


def test_a_key_that_ended_starts_again_above_its_watermark() -> None:
    store = StateStore()
    s = store.get(0, "a")
    s.n, s.watermark = 1, 3
    store.end(0, "a")
    again = store.get(0, "a")
    assert again.n == 0 and again.watermark == 3


def test_capacity_eviction_drops_the_least_recently_used() -> None:
    store = StateStore(max_sequences=2)
    for i, key in enumerate(["a", "b", "c"]):
        s = store.get(i % 2, key)
        s.n, s.watermark, s.last_seen = 1, i, float(i)
    store.get(0, "a").last_seen = 10.0  # "a" used last
    evicted = store.evict_over_capacity()
    assert [(e.partition, e.key, e.cause) for e in evicted] == [(1, "b", "capacity")]
    assert len(store) == 2


def test_idle_eviction() -> None:
    store = StateStore()
    s = store.get(0, "a")
    s.n, s.last_seen = 3, 100.0
    store.get(0, "b").last_seen = 195.0
    evicted = store.evict_idle(50.0, now=200.0)
    assert [(e.key, e.cause, e.n) for e in evicted] == [("a", "idle", 3)]
    assert store.watermark(0, "a") == s.watermark


def test_a_version_1_record_is_still_read() -> None:
    # Written by the previous daemon: no "v", no "used".
    header = b'{"model":"m@1","wm":5,"first":2,"n":3,"step":4,"reset":false,"shapes":[[2]]}'
    body = np.array([1.5, -2.0], dtype="<f4").tobytes()
    raw = b"LSTMD1" + len(header).to_bytes(4, "little") + header + body
    state, model = SequenceState.from_snapshot(raw, restored_at=12.5)
    assert (model, state.n, state.watermark, state.first_offset, state.last_step) == ("m@1", 3, 5, 2, 4)
    assert state.tensors is not None and state.tensors[0].tolist() == [1.5, -2.0]
    assert state.last_seen == 12.5


def test_the_last_use_survives_a_snapshot() -> None:
    import time

    state = SequenceState(n=1, tensors=[np.zeros(2, np.float32)], last_seen=time.monotonic() - 100)
    back, _ = SequenceState.from_snapshot(state.snapshot("m"))
    assert 99 < time.monotonic() - back.last_seen < 101


def test_an_evicted_sequence_keeps_its_last_step() -> None:
    from tests.support.fakes import make, outputs, recs

    proc, _ = make(max_sequences=1)
    got = outputs(proc, recs([("a", {"x": [1], "step": 5})]))
    got += outputs(proc, recs([("b", {"x": [1]})], start=1))  # evicts "a"
    # a's step 5 arriving again (a producer's retry) is a duplicate, not the first
    # step of a new sequence.
    got += outputs(proc, recs([("a", {"x": [1], "step": 5})], start=2))
    assert [(o.get("seq"), o.get("n"), o.get("evicted")) for o in got] == [
        ("a", 1, None),
        ("b", 1, None),
        ("a", 1, True),
    ]
    # Its reset record carries the step, and it is not tombstoned after the commit.
    changes = {key: SequenceState.from_snapshot(v)[0] for _, key, v in proc.store.take_changes("m@0") if v}
    assert changes["a"].n == 0 and changes["a"].last_step == 5
    assert proc.store.forget_ended_before(0, 10) == []


def test_the_memory_of_evicted_sequences_is_bounded() -> None:
    """LSTMD_MAX_ENDED_SEQUENCES: past it the oldest evicted sequence is forgotten (its
    record deleted by a tombstone), once its partition committed its watermark."""
    store = StateStore(max_sequences=1, max_ended=2)
    for i, key in enumerate("abcdefgh"):
        s = store.get(0, key)
        s.tensors, s.n, s.watermark, s.last_step, s.last_seen = [np.ones(1, np.float32)], 1, i, 7, float(i)
        store.mark_changed(0, key)
        store.evict_over_capacity()  # evicts the previous key: 7 in all, a to g
    assert store.ended() == 7  # nothing committed yet: every watermark may still be redelivered
    store.take_changes("m")
    # Five too many, but only a, b and c are below the commit: they go, d to g wait.
    assert store.forget_ended_before(0, 3) == []
    assert store.ended() == 4 and [store.watermark(0, k) for k in "abcd"] == [-1, -1, -1, 3]
    assert sorted((k, v) for _, k, v in store.take_changes("m")) == [(k, None) for k in "abc"]
    store.forget_ended_before(0, 100)
    assert store.ended() == 2 and store.watermark(0, "f") == 5 and store.watermark(0, "g") == 6
    assert sorted((k, v) for _, k, v in store.take_changes("m")) == [(k, None) for k in "de"]
    store.forget_ended_before(0, 101)
    assert store.take_changes("m") == []  # within the bound: nothing more goes


def test_model_ids_name_the_same_model_by_their_hash() -> None:
    from daemon.core.state import same_model

    assert same_model("a@0123456789ab", "b@0123456789ab")
    assert same_model("my@model@0123456789ab", "b@0123456789ab")  # a stem may hold "@"
    assert not same_model("a@0123456789ab", "a@ba9876543210")
    assert same_model("m@0", "m@0") and not same_model("m", "m@0")


def test_the_largest_state_record_is_the_same_whenever_it_is_computed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start-up size check and its test compute it in different processes at
    different times: a real record's last-use time takes 12 to 14 characters."""
    shapes = [(1, 16), (1, 16)]
    sizes = []
    for now in (1796497145.9, 1796497145.913):
        monkeypatch.setattr("daemon.core.state.time.time", lambda now=now: now)
        sizes.append(snapshot_bytes("m@1", shapes))
        real = SequenceState(tensors=[np.zeros(s, np.float32) for s in shapes], n=10**18, watermark=10**18)
        assert len(real.snapshot("m@1")) <= sizes[-1]
    assert sizes[0] == sizes[1]


def test_state_keys_of_other_models_never_collide_with_a_sequence_id() -> None:
    from daemon.core.state import StateKey, parse_state_key, state_key

    for key in ["a", "", "ÿ", "\x00", "\uffff"]:
        assert parse_state_key(state_key(key)) == StateKey(None, key)
        assert parse_state_key(state_key(key, "bbbb")) == StateKey("bbbb", key)
        assert state_key(key)[:1] not in (b"\xff", b"\xfe")  # UTF-8 never has these bytes
    assert parse_state_key(state_key("", "bbbb", following=True)) == StateKey("bbbb", "", following=True)
    assert parse_state_key(None) == StateKey(None, "")


def test_an_inexact_state_survives_its_snapshot_and_its_install() -> None:
    state = SequenceState(exact=False, watermark=7)  # an empty placeholder of a sequence not replayed
    restored, _ = SequenceState.from_snapshot(state.snapshot("m@a"))
    assert restored.exact is False and restored.watermark == 7
    store = StateStore()
    store.install(0, "k", restored)
    assert store.peek(0, "k") is restored  # live, not remembered as ended
    restored.reset()
    assert restored.exact is True
    assert SequenceState.from_snapshot(SequenceState(n=1).snapshot("m@a")).state.exact is True
