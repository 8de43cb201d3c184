"""A model upgrade and a warm start on the real broker.

Model change: model A serves the first part of many interleaved sequences; the
daemon stops and starts again with model B (same architecture, other weights).
Every prediction after the switch must equal B's stateless output on the WHOLE
prefix of its sequence (the steps A served included: the rebuild replayed them
through B), nothing may be published for the replayed inputs, and no sequence
starts over but the one whose first input was deleted from the input topic,
announced as `history_expired`.

Warm start: with LSTMD_PUBLISH_FROM between two record timestamps, nothing is
published for the inputs before it, and every prediction after it equals the
oracle over the whole history.
"""

from __future__ import annotations

import datetime
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition

from daemon.devtools.localkafka import LocalKafka
from tests.conftest import TopicFactory
from tests.oracle import assert_matches, expected_outputs_many
from tests.support import models
from tests.support.streams import (
    DaemonProcess,
    Stream,
    consume,
    daemon_env,
    interleaved_stream,
    prediction_source,
    produce,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def model_a() -> Path:
    return models.built("stacked_lstm_gru")


@pytest.fixture(scope="module")
def model_b(model_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model A's architecture with other weights: its outputs differ from A's."""
    return models.reweighted(model_a, 99, tmp_path_factory.mktemp("model-b") / "model_b.keras")


def open_segments(stream: Stream, upto: int) -> dict[tuple[str, int], int]:
    """{(key, segment): index of its first event} of the segments still open after
    the first `upto` events (a step was applied, no end yet)."""
    last: dict[str, int] = {}
    for i, (key, _) in enumerate(stream.events[:upto]):
        last[key] = i
    out = {}
    for key, i in last.items():
        value = stream.events[i][1]
        if i in stream.segment_of and not value.get("end"):
            _, seg, _ = stream.segment_of[i]
            out[(key, seg)] = _first_event(stream, key, seg)
    return out


def _first_event(stream: Stream, key: str, seg: int) -> int:
    return min(i for i, (k, s, _) in stream.segment_of.items() if (k, s) == (key, seg))


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_a_model_upgrade_rebuilds_every_open_sequence(
    kafka: LocalKafka, topics: TopicFactory, model_a: Path, model_b: Path, delivery: str
) -> None:
    names = topics({"in": 2, "out": 2, "dlq": 1})
    stream = interleaved_stream(n_keys=30, n_events=1000, features=3, seed=41)
    split = 700
    placed = produce(kafka.bootstrap, names["in"], stream.events[:split])
    env = daemon_env(kafka.bootstrap, names, model_a, LSTMD_DELIVERY=delivery)
    served_by_a = [i for i in stream.predicted_events if i < split]
    daemon = DaemonProcess(env)
    try:
        consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(served_by_a),
            distinct=prediction_source,
            while_running=daemon,
        )
    finally:
        assert daemon.stop() == 0, "\n".join(daemon.lines[-30:])

    # The open sequence of partition 0 with the oldest first input loses it (retention).
    opened = open_segments(stream, split)
    assert len(opened) >= 20, "the test needs many open sequences at the switch"
    continued = {stream.segment_of[i][:2] for i in stream.predicted_events if i >= split}
    expired = min((i for seg, i in opened.items() if placed[i][0] == 0 and seg in continued), default=None)
    assert expired is not None
    expired_seg = next(seg for seg, i in opened.items() if i == expired)
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    try:
        admin.delete_records({TopicPartition(names["in"], 0): placed[expired][1] + 1})
    finally:
        admin.close()

    placed += produce(kafka.bootstrap, names["in"], stream.events[split:])
    daemon = DaemonProcess(env | {"LSTMD_MODEL_PATH": str(model_b)})
    try:
        out = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            distinct=prediction_source,
            settle=1.0,
            while_running=daemon,
        )
        rebuilt = [ev for ev in daemon.events() if ev.get("event") == "partition_rebuilt"]
    finally:
        assert daemon.stop() == 0, "\n".join(daemon.lines[-30:])

    values = [orjson.loads(r.value) for r in out]
    notices = [v for v in values if v.get("evicted")]
    assert [(n["seq"], n["cause"]) for n in notices] == [(expired_seg[0], "history_expired")]
    # Every open sequence rebuilt but the expired one, by one rebuild per partition.
    assert sorted(ev["partition"] for ev in rebuilt) == [0, 1]
    assert sum(ev["rebuilt"] for ev in rebuilt) == len(opened) - 1
    assert [ev["dropped"] for ev in rebuilt if ev["dropped"]] == [{"history_expired": 1}]  # counts per cause

    by_source: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for v in values:
        if "y" in v:
            by_source[(v["partition"], v["offset"])].append(v)
    # One prediction per input, none for the replayed ones: A answered every input
    # before the switch, B every one after it.
    assert Counter(len(p) for p in by_source.values()) == Counter({1: len(stream.predicted_events)})
    assert set(by_source) == {placed[i] for i in stream.predicted_events}
    model_of = {i: by_source[placed[i]][0]["model"] for i in stream.predicted_events}
    a_id, b_id = model_of[served_by_a[0]], model_of[stream.predicted_events[-1]]
    assert a_id != b_id
    assert all(model_of[i] == (a_id if i < split else b_id) for i in stream.predicted_events)

    # After the switch: B's stateless output on the whole prefix of its sequence; the
    # expired one starts over at its first input after the switch.
    after = [i for i in stream.predicted_events if i >= split]
    segments = sorted({stream.segment_of[i][:2] for i in after})
    restart = min(
        t for i in after if stream.segment_of[i][:2] == expired_seg for t in [stream.segment_of[i][2]]
    )
    xs = [
        np.asarray(stream.segments[seg][restart if seg == expired_seg else 0 :], np.float32)
        for seg in segments
    ]
    expected = dict(zip(segments, expected_outputs_many(model_b, xs), strict=True))
    for i in after:
        key, seg, t = stream.segment_of[i]
        pred = by_source[placed[i]][0]
        if (key, seg) == expired_seg:
            t -= restart
        assert pred["n"] == t + 1, (pred, key, seg, t)
        assert_matches(np.asarray(pred["y"]), expected[(key, seg)][t])


def test_a_warm_start_publishes_from_its_time_on(
    kafka: LocalKafka, topics: TopicFactory, model_a: Path
) -> None:
    names = topics({"in": 2, "out": 2, "dlq": 1})
    stream = interleaved_stream(n_keys=12, n_events=400, features=3, seed=43)
    base_ms = 1_700_000_000_000
    cutoff_index = 250
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=5)
    futures = [
        producer.send(names["in"], key=k.encode(), value=orjson.dumps(v), timestamp_ms=base_ms + 1000 * i)
        for i, (k, v) in enumerate(stream.events)
    ]
    producer.flush()
    placed = [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]  # type: ignore[no-untyped-call]
    producer.close()
    # Half a second before the cutoff event's timestamp, in another time zone.
    cutoff = datetime.datetime.fromtimestamp(
        (base_ms + 1000 * cutoff_index - 500) / 1000, tz=datetime.timezone(datetime.timedelta(hours=2))
    )
    wanted = [i for i in stream.predicted_events if i >= cutoff_index]
    daemon = DaemonProcess(daemon_env(kafka.bootstrap, names, model_a, LSTMD_PUBLISH_FROM=cutoff.isoformat()))
    try:
        out = consume(kafka.bootstrap, names["out"], at_least=len(wanted), settle=1.0, while_running=daemon)
    finally:
        assert daemon.stop() == 0, "\n".join(daemon.lines[-30:])
    preds = {(v["partition"], v["offset"]): v for v in map(orjson.loads, (r.value for r in out)) if "y" in v}
    assert len(out) == len(preds) == len(wanted)  # one each, nothing before the cutoff
    assert set(preds) == {placed[i] for i in wanted}
    segments = sorted({stream.segment_of[i][:2] for i in wanted})
    expected = dict(
        zip(
            segments,
            expected_outputs_many(model_a, [np.asarray(stream.segments[s], np.float32) for s in segments]),
            strict=True,
        )
    )
    spanning = {seg for seg in segments if _first_event(stream, *seg) < cutoff_index}
    assert len(spanning) >= 5, "too few sequences span the cutoff to test the warm start"
    for i in wanted:
        key, seg, t = stream.segment_of[i]
        pred = preds[placed[i]]
        assert pred["n"] == t + 1, (pred, key, t)
        assert_matches(np.asarray(pred["y"]), expected[(key, seg)][t])
