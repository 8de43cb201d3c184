"""A model swapped while the daemon runs, on the real broker with real models.

Model A serves a steady stream written by librdkafka; mid-stream model B's file
replaces A's at LSTMD_MODEL_PATH (as a ConfigMap update does). The daemon loads B
beside A, builds B's states in the background and switches between two batches:
every input is answered once, A's answers before the switch equal A on the whole
prefix, B's after it equal B on the whole prefix, and /readyz never says 503. With
a shadow model beside them (one the fast engine cannot serve, so the keras engine
steps it), every shadow prediction equals the shadow model on the whole prefix,
before and after the swap. A kill -9 in the middle of the swap: the daemon started
again with B answers every input after it with B's output on the whole prefix.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from daemon.devtools.localkafka import LocalKafka
from tests.conftest import TopicFactory
from tests.oracle import assert_matches, expected_outputs_many
from tests.support import models
from tests.support.librdkafka import Writer
from tests.support.streams import (
    DaemonProcess,
    Stream,
    consume,
    daemon_env,
    interleaved_stream,
    prediction_source,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def model_a() -> Path:
    return models.built("stacked_lstm_gru")


@pytest.fixture(scope="module")
def model_b(model_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model A's architecture with other weights: its outputs differ from A's."""
    return models.reweighted(model_a, 7, tmp_path_factory.mktemp("swap-b") / "model_b.keras")


@pytest.fixture(scope="module")
def shadow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three features like A and B, and a layer the fast engine refuses."""
    return models.unit_norm(tmp_path_factory.mktemp("swap-shadow") / "shadow.keras", features=3)


def swap_file(path: Path, model: Path) -> None:
    """Replace the served file at once, as a ConfigMap update swaps its symlink."""
    staged = path.with_suffix(".staged.keras")
    shutil.copy(model, staged)
    os.replace(staged, path)


class Readiness(threading.Thread):
    """/readyz every 50 ms from the daemon's first ready answer on: every status seen."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.statuses: list[tuple[float, int]] = []
        self.ready = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    status = r.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                status = 0
            if status == 200:
                self.ready.set()
            if self.ready.is_set():
                self.statuses.append((time.time(), status))
            self.done.wait(0.05)


class Sent(Writer):
    """A librdkafka writer that remembers when it wrote each event (for latencies)."""

    def __init__(self, bootstrap: str, **config: Any) -> None:
        super().__init__(bootstrap, **config)
        self.at: dict[int, float] = {}

    def write(
        self, topic: str, tag: int, key: bytes | None, value: bytes | None, headers: Any = None
    ) -> None:
        self.at[tag] = time.time()
        super().write(topic, tag, key, value, headers)


def write_steadily(bootstrap: str, topic: str, stream: Stream, per_s: float, swap_at: int, swap: Any) -> Sent:
    """The stream at `per_s` events a second through librdkafka (zstd); `swap()` once
    `swap_at` events are written."""
    writer = Sent(bootstrap, **{"compression.type": "zstd", "linger.ms": 5})
    started = time.monotonic()
    for i, (key, value) in enumerate(stream.events):
        if i == swap_at:
            swap()
        writer.write(topic, i, key.encode(), orjson.dumps(value))
        writer.producer.poll(0)
        delay = started + (i + 1) / per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return writer


def by_model(
    stream: Stream, placed: dict[int, tuple[int, int]], values: list[dict[str, Any]]
) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """model id -> event index -> its predictions by that model."""
    index = {where: i for i, where in placed.items()}
    out: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for v in values:
        if v.get("y") is not None:
            out[v["model"]][index[(v["partition"], v["offset"])]].append(v)
    return out


def check_oracle(model: Path, stream: Stream, answered: dict[int, list[dict[str, Any]]]) -> None:
    """Each prediction equals the model's stateless output on the whole prefix."""
    segments = sorted({stream.segment_of[i][:2] for i in answered})
    xs = [np.asarray(stream.segments[seg], np.float32) for seg in segments]
    expected = dict(zip(segments, expected_outputs_many(model, xs), strict=True))
    for i, preds in answered.items():
        key, seg, t = stream.segment_of[i]
        for pred in preds:
            assert pred["n"] == t + 1, (pred, key, seg, t)
            assert_matches(np.asarray(pred["y"]), expected[(key, seg)][t])


def timeline(
    readiness: Readiness,
    values: list[dict[str, Any]],
    index: dict[tuple[int, int], int],
    sent: dict[int, float],
    at: float,
) -> str:
    """Per second around the switch (0: the second it was promoted in): /readyz, the
    predictions of each model, and their latency from the write to the prediction."""
    rows: dict[int, dict[str, Any]] = defaultdict(lambda: {"n": defaultdict(int), "lat": [], "ready": set()})
    for v in values:
        if v.get("y") is not None:
            row = rows[math.floor(v["ts"] - at)]
            row["n"][v["model"].rpartition("@")[2][:6]] += 1
            row["lat"].append(1000 * (v["ts"] - sent[index[(v["partition"], v["offset"])]]))
    for t, status in readiness.statuses:
        rows[math.floor(t - at)]["ready"].add(status)
    lines = ["second | /readyz | predictions by model | latency ms p50 / p99 / max"]
    for second in sorted(rows):
        row = rows[second]
        lat = np.percentile(row["lat"], [50, 99, 100]).round(1).tolist() if row["lat"] else []
        lines.append(f"{second:+4d} | {sorted(row['ready'])} | {dict(row['n'])} | {lat}")
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("delivery", "engine", "shadow"),
    [("at-least-once", "fast", True), ("exactly-once", "keras", False)],
    ids=["at-least-once-fast-with-shadow", "exactly-once-keras"],
)
def test_a_model_swapped_under_a_steady_stream(
    kafka: LocalKafka,
    topics: TopicFactory,
    model_a: Path,
    model_b: Path,
    shadow_model: Path,
    tmp_path: Path,
    delivery: str,
    engine: str,
    shadow: bool,
) -> None:
    names = topics({"in": 2, "out": 2, "dlq": 1, "out.shadow": 2})
    stream = interleaved_stream(n_keys=40, n_events=1500, features=3, seed=51)
    served = tmp_path / "served.keras"
    shutil.copy(model_a, served)
    extra = {"LSTMD_DELIVERY": delivery, "LSTMD_ENGINE": engine, "LSTMD_MODEL_WATCH_INTERVAL_S": "0.5"}
    if shadow:
        extra |= {"LSTMD_SHADOW_MODEL_PATH": str(shadow_model), "LSTMD_SHADOW_TOPIC": names["out.shadow"]}
    daemon = DaemonProcess(daemon_env(kafka.bootstrap, names, served, **extra))
    readiness = Readiness(int(daemon.wait_for("http_listening")["port"]))
    readiness.start()
    try:
        assert readiness.ready.wait(90), "\n".join(daemon.lines[-30:])
        writer = write_steadily(
            kafka.bootstrap, names["in"], stream, 150.0, 500, lambda: swap_file(served, model_b)
        )
        placed = writer.flush()
        sent = writer.at
        promoted = daemon.wait_for("model_promoted")
        out = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            distinct=prediction_source,
            settle=1.0,
            while_running=daemon,
        )
        shadowed = (
            consume(kafka.bootstrap, names["out.shadow"], at_least=1, settle=2.0, while_running=daemon)
            if shadow
            else []
        )
    finally:
        readiness.done.set()
        assert daemon.stop() == 0, "\n".join(daemon.lines[-30:])
    values = [orjson.loads(r.value) for r in out]
    answers = by_model(stream, placed, values)
    assert set(answers) == {promoted["previous"], promoted["model"]}
    by_a, by_b = answers[promoted["previous"]], answers[promoted["model"]]
    # Every input answered once: A before the switch, B after it, in each partition.
    assert sorted([*by_a, *by_b]) == stream.predicted_events
    assert all(len(p) == 1 for p in [*by_a.values(), *by_b.values()])
    for partition in (0, 1):
        last_a = max((placed[i][1] for i in by_a if placed[i][0] == partition), default=-1)
        first_b = min(placed[i][1] for i in by_b if placed[i][0] == partition)
        assert last_a < first_b
    assert len(by_a) > 300 and len(by_b) > 300
    check_oracle(model_a, stream, by_a)
    check_oracle(model_b, stream, by_b)
    bad = [(t, s) for t, s in readiness.statuses if s != 200]
    at = datetime.datetime.fromisoformat(promoted["timestamp"]).timestamp()
    print(timeline(readiness, values, {w: i for i, w in placed.items()}, sent, at))
    assert readiness.statuses and not bad, bad
    if shadow:
        shadow_values = [orjson.loads(r.value) for r in shadowed]
        (shadow_answers,) = by_model(stream, placed, shadow_values).values()
        assert len(shadow_answers) > len(stream.predicted_events) // 2  # it followed early
        check_oracle(shadow_model, stream, shadow_answers)


def test_a_kill_in_the_middle_of_a_swap_is_finished_exactly_by_the_next_start(
    kafka: LocalKafka, topics: TopicFactory, model_a: Path, model_b: Path, tmp_path: Path
) -> None:
    names = topics({"in": 2, "out": 2, "dlq": 1})
    # Long sequences: the candidate's build replays thousands of inputs (keras engine).
    stream = interleaved_stream(n_keys=20, n_events=2400, features=3, seed=53)
    served = tmp_path / "served.keras"
    shutil.copy(model_a, served)
    env = daemon_env(kafka.bootstrap, names, served, LSTMD_MODEL_WATCH_INTERVAL_S="0.2")
    first, split = 2000, 2000
    writer = Writer(kafka.bootstrap, **{"compression.type": "lz4"})
    for i, (key, value) in enumerate(stream.events[:split]):
        writer.write(names["in"], i, key.encode(), orjson.dumps(value))
    placed = dict(writer.flush())
    daemon = DaemonProcess(env)
    try:
        consume(
            kafka.bootstrap,
            names["out"],
            at_least=len([i for i in stream.predicted_events if i < first]),
            distinct=prediction_source,
            while_running=daemon,
        )
        swap_file(served, model_b)
        building = daemon.wait_for("candidate_building")
        assert not [e for e in daemon.events() if e.get("event") == "model_promoted"]
    finally:
        daemon.kill()
    assert building["model"].endswith(models_tag(model_b))
    for i, (key, value) in enumerate(stream.events[split:], start=split):
        writer.write(names["in"], i, key.encode(), orjson.dumps(value))
    placed |= writer.flush()
    again = DaemonProcess(env)  # the file is B now
    try:
        out = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            distinct=prediction_source,
            settle=1.0,
            while_running=again,
        )
    finally:
        assert again.stop() == 0, "\n".join(again.lines[-30:])
    answers = by_model(stream, placed, [orjson.loads(r.value) for r in out])
    assert len(answers) == 2
    a_id = next(m for m in answers if not m.endswith(models_tag(model_b)))
    b_id = next(m for m in answers if m.endswith(models_tag(model_b)))
    # Every input answered; each answer equals its model on the whole prefix (a repeat
    # of what A answered before the kill is B's: at-least-once across a model change).
    assert sorted(set(answers[a_id]) | set(answers[b_id])) == stream.predicted_events
    assert all(i < split for i in answers[a_id])
    assert all(i in answers[b_id] for i in stream.predicted_events if i >= split)
    check_oracle(model_a, stream, answers[a_id])
    check_oracle(model_b, stream, answers[b_id])


def models_tag(path: Path) -> str:
    """The model id's content part (`name@<sha256 prefix>`)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
