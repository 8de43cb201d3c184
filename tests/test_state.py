"""State snapshots and the store's bookkeeping: watermarks, changes, eviction."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.core.state import SequenceState, SnapshotError, StateStore


def test_snapshot_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    tensors = [rng.normal(size=8).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    state = SequenceState(tensors=tensors, n=7, watermark=41, first_offset=30, last_step=6)
    back, model = SequenceState.restore(state.snapshot("m@abc"))
    assert model == "m@abc"
    assert (back.n, back.watermark, back.first_offset, back.last_step) == (7, 41, 30, 6)
    assert back.tensors is not None
    for a, b in zip(back.tensors, tensors, strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)


def test_reset_record_keeps_the_watermark() -> None:
    back, _ = SequenceState.restore(SequenceState(watermark=9).snapshot("m"))
    assert back.tensors is None and back.n == 0 and back.watermark == 9


@pytest.mark.parametrize("raw", [b"", b"LSTMD1", b"LSTMD1\x05\x00\x00\x00{bad}", b"XX" * 10])
def test_corrupt_snapshots_are_refused(raw: bytes) -> None:
    with pytest.raises(SnapshotError):
        SequenceState.restore(raw)


def test_changes_and_ended_watermarks() -> None:
    store = StateStore()
    a = store.get(0, "a")
    a.tensors, a.n, a.watermark = [np.ones(2, np.float32)], 1, 5
    store.touched(0, "a")
    changes = store.take_changes("m")
    assert [(p, k) for p, k, _ in changes] == [(0, "a")]
    assert store.take_changes("m") == []
    store.end(0, "a")
    assert len(store) == 0 and store.watermark(0, "a") == 5
    ((_, key, raw),) = store.take_changes("m")
    restored, _ = SequenceState.restore(raw or b"")
    assert key == "a" and restored.n == 0 and restored.watermark == 5
    assert store.committed(0, 5) == []  # offset 5 itself not yet committed
    assert store.committed(0, 6) == ["a"]
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


def test_model_ids_name_the_same_model_by_their_hash() -> None:
    from daemon.core.state import same_model

    assert same_model("a@0123456789ab", "b@0123456789ab")
    assert same_model("my@model@0123456789ab", "b@0123456789ab")  # a stem may hold "@"
    assert not same_model("a@0123456789ab", "a@ba9876543210")
    assert same_model("m@0", "m@0") and not same_model("m", "m@0")
