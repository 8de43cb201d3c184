"""LSTMD_WORKERS=2 on the real broker: two worker processes of one pod share a
4-partition topic; every prediction equals the oracle, none is lost, the pod's
one /metrics adds both workers up, and SIGTERM exits 0."""

from __future__ import annotations

import time

import pytest

from daemon.devtools.localkafka import LocalKafka
from tests import models
from tests.conftest import TopicFactory
from tests.streams import (
    DaemonProcess,
    check_predictions,
    consume,
    daemon_env,
    interleaved_stream,
    metric,
    produce,
    scrape,
)

pytestmark = pytest.mark.kafka


def test_two_workers_share_the_partitions_and_report_as_one_pod(
    kafka: LocalKafka, topics: TopicFactory
) -> None:
    model = models.built("stacked_lstm_gru")
    names = topics({"in": 4, "out": 2, "dlq": 1})
    stream = interleaved_stream(n_keys=24, n_events=800, features=3, seed=21)
    placed = produce(kafka.bootstrap, names["in"], stream.events)
    env = daemon_env(
        kafka.bootstrap,
        names,
        model,
        LSTMD_WORKERS="2",
        LSTMD_GROUP_INSTANCE_ID="lstmd-7",
        LSTMD_ENGINE="fast",
    )
    daemon = DaemonProcess(env)
    try:
        port = int(daemon.wait_for("http_listening")["port"])
        outputs = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            settle=1.0,
            while_running=daemon,
        )
        deadline = time.monotonic() + 20
        while True:  # both workers ready, the counters written by both
            status, ready = scrape(port, "/readyz")
            _, text = scrape(port)
            if status == 200 and metric(text, "lstmd_predictions_produced_total") == len(
                stream.predicted_events
            ):
                break
            assert time.monotonic() < deadline, f"{ready}\n{text}"
            time.sleep(0.5)
        assert scrape(port, "/livez")[0] == 200
    finally:
        assert daemon.stop() == 0, "\n".join(daemon.lines[-30:])
    check_predictions(model, stream, placed, outputs)
    assert metric(text, "lstmd_events_consumed_total") == len(stream.events)
    assert metric(text, "lstmd_assigned_partitions") == 4
    assert all(f'lstmd_consumer_lag{{partition="{p}"}}' in text for p in range(4))
    assigned = [ev for ev in daemon.events() if ev.get("event") == "partitions_assigned"]
    assert {ev["worker"] for ev in assigned} == {0, 1}
    members = {ev["settings"]["group_instance_id"] for ev in daemon.events() if ev.get("event") == "starting"}
    assert members == {"lstmd-7", "lstmd-7-w0", "lstmd-7-w1"}  # the supervisor's, then each worker's
    assert not any('"level": "error"' in line for line in daemon.lines)
