"""State that is never wrong: kill -9, group changes, a broker outage, idle eviction.

Every test checks every prediction against the stateless-prefix oracle (1e-5)
and that no input with an x is left without a prediction. At-least-once may
repeat a prediction (each copy must still equal the oracle); exactly-once, read
through a read_committed consumer, may not.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from daemon.devtools.localkafka import LocalKafka
from tests.conftest import TopicFactory
from tests.oracle import assert_matches, expected_outputs
from tests.support import models
from tests.support.streams import (
    DaemonProcess,
    check_predictions,
    consume,
    daemon_env,
    interleaved_stream,
    outage_run,
    prediction_source,
    produce,
)

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def model() -> Path:
    return models.built("stacked_lstm_gru")


def outputs_so_far(bootstrap: str, topic: str) -> int:
    """Inputs answered so far (repeats of an at-least-once restart counted once)."""
    return len({k for r in consume(bootstrap, topic, at_least=0, timeout=2.0) if (k := prediction_source(r))})


@pytest.mark.parametrize(
    ("delivery", "engine", "kafka_client"),
    # The fast engine too: its repeats, recomputed in waves of other sizes after each
    # kill, must be bit-identical (check_predictions compares every copy). Each client
    # library in both delivery modes (the engine is the client's business on neither).
    [
        ("at-least-once", "keras", "kafka-python"),
        ("exactly-once", "keras", "kafka-python"),
        ("at-least-once", "fast", "kafka-python"),
        ("at-least-once", "fast", "confluent-kafka"),
        ("exactly-once", "keras", "confluent-kafka"),
    ],
    indirect=["kafka_client"],
)
def test_kill_9_five_times_mid_stream(
    kafka: LocalKafka, topics: TopicFactory, model: Path, delivery: str, engine: str, kafka_client: str
) -> None:
    names = topics({"in": 2, "out": 2, "dlq": 1})
    stream = interleaved_stream(n_keys=16, n_events=2500, features=3, seed=21)
    placed = produce(kafka.bootstrap, names["in"], stream.events)
    # A killed member holds its partitions until its session expires: keep it short.
    extra = {
        "LSTMD_DELIVERY": delivery,
        "LSTMD_ENGINE": engine,
        "LSTMD_KAFKA_MAX_POLL_RECORDS": "40",
        "LSTMD_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "LSTMD_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    }
    if delivery == "exactly-once":
        # A static member's transactional id survives the restart, which fences the
        # killed process's open transaction at once.
        extra["LSTMD_GROUP_INSTANCE_ID"] = "pod-0"
    env = daemon_env(kafka.bootstrap, names, model, **extra)
    rng = random.Random(7)
    kills = 0
    while kills < 5:
        daemon = DaemonProcess(env)
        daemon.wait_for("partition_restored")
        time.sleep(rng.uniform(0.3, 1.5))
        done = outputs_so_far(kafka.bootstrap, names["out"])
        daemon.kill()
        kills += 1
        assert done < len(stream.predicted_events), f"stream finished before kill {kills}"
    final = DaemonProcess(env)
    try:
        out = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            distinct=prediction_source,
            settle=2.0,
            timeout=120,
            while_running=final,
        )
    finally:
        assert final.stop() == 0
    check_predictions(model, stream, placed, out, exactly_once=delivery == "exactly-once")


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_daemons_join_and_leave_mid_stream(
    kafka: LocalKafka, topics: TopicFactory, model: Path, delivery: str
) -> None:
    names = topics({"in": 3, "out": 3, "dlq": 1})
    stream = interleaved_stream(n_keys=24, n_events=3000, features=3, seed=33)
    placed = produce(kafka.bootstrap, names["in"], stream.events)
    env = daemon_env(
        kafka.bootstrap, names, model, LSTMD_KAFKA_MAX_POLL_RECORDS="40", LSTMD_DELIVERY=delivery
    )
    a = DaemonProcess(env)
    b = c = None
    try:
        a.wait_for("partition_restored")
        b = DaemonProcess(env)
        b.wait_for("partition_restored")
        c = DaemonProcess(env)
        c.wait_for("partition_restored")
        assert outputs_so_far(kafka.bootstrap, names["out"]) < len(stream.predicted_events)
        assert a.stop() == 0  # one leaves mid-stream
        out = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            distinct=prediction_source,
            settle=2.0,
            timeout=120,
            while_running=b,
        )
    finally:
        codes = [d.stop() for d in (b, c) if d is not None]
    assert codes == [0, 0]
    check_predictions(model, stream, placed, out, exactly_once=delivery == "exactly-once")
    moved = [ev for d in (a, b, c) if d for ev in d.events() if ev.get("event") == "partition_released"]
    assert moved, "no partition changed hands: the test proved nothing"


@pytest.mark.parametrize(
    ("delivery", "down_for", "kafka_client"),
    [
        ("at-least-once", 5.0, "kafka-python"),
        ("at-least-once", 5.0, "confluent-kafka"),
        # Longer than the transaction timeout (10 s): the broker aborts the open
        # transaction and fences its producer, which the daemon must replace.
        # Not yet on confluent-kafka: it failed once in three clean-clone runs
        # (issue 19's note).
        ("exactly-once", 15.0, "kafka-python"),
    ],
    indirect=["kafka_client"],
)
def test_broker_down_for_seconds_mid_stream(
    kafka_broker_factory: Any, model: Path, delivery: str, down_for: float, kafka_client: str
) -> None:
    broker: LocalKafka = kafka_broker_factory()
    run = outage_run(broker, model, delivery=delivery, n_keys=12, n_events=2500, seed=44)
    try:
        before = outputs_so_far(broker.bootstrap, "predictions")
        assert before < len(run.stream.predicted_events)
        broker.restart(down_for=down_for)
        out = run.predictions(while_running=run.daemon)
    finally:
        assert run.daemon.stop() == 0
    run.check(out)


def test_idle_sequence_is_evicted_announced_and_starts_over(
    kafka: LocalKafka, topics: TopicFactory, model: Path
) -> None:
    names = topics({"in": 1, "out": 1, "dlq": 1})
    env = daemon_env(kafka.bootstrap, names, model, LSTMD_SEQUENCE_IDLE_TIMEOUT_S="2")
    rng = np.random.default_rng(3)
    xs = rng.normal(size=(8, 3)).round(4).astype(np.float32)
    daemon = DaemonProcess(env)
    try:
        daemon.wait_for("partition_restored")
        produce(kafka.bootstrap, names["in"], [("room", {"x": x.tolist()}) for x in xs[:5]])
        consume(kafka.bootstrap, names["out"], at_least=5, while_running=daemon)
        time.sleep(4.0)  # idle past the timeout: evicted
        produce(kafka.bootstrap, names["in"], [("room", {"x": x.tolist()}) for x in xs[5:]])
        out = consume(kafka.bootstrap, names["out"], at_least=9, settle=1.0, while_running=daemon)
    finally:
        assert daemon.stop() == 0
    values = [orjson.loads(r.value) for r in out]
    notices = [v for v in values if v.get("evicted")]
    preds = [v for v in values if not v.get("evicted")]
    assert [(v["seq"], v["cause"], v["n"], v["offset"]) for v in notices] == [("room", "idle", 5, 4)]
    assert [v["n"] for v in preds] == [1, 2, 3, 4, 5, 1, 2, 3]
    # Documented behaviour: after an eviction the sequence starts over from a zero state.
    assert_matches(np.asarray([v["y"] for v in preds[:5]]), expected_outputs(model, xs[:5]))
    assert_matches(np.asarray([v["y"] for v in preds[5:]]), expected_outputs(model, xs[5:]))
