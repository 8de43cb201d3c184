"""Bad input never stops the daemon and never loses a record; Kafka faults get
clear errors and no busy loop. All against the real broker."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from daemon.config import Settings
from daemon.core.state import snapshot_bytes
from daemon.devtools.localkafka import LocalKafka, create_topics
from daemon.inference.model import load_model
from daemon.kafka.topics import STATE_RECORD_OVERHEAD_BYTES, ensure_topics
from tests.conftest import TopicFactory
from tests.support import models
from tests.support.streams import (
    DaemonProcess,
    Stream,
    check_predictions,
    consume,
    daemon_env,
    interleaved_stream,
    metric,
    produce,
    scrape,
)

# The start-up checks (missing topics, sizes, a broker not up yet) run on kafka-python's
# admin client whichever LSTMD_KAFKA_CLIENT: once. What the clients do, on both.
pytestmark = pytest.mark.kafka

MAX_BYTES = 4096

# (key, raw value, expected lstmd.error.class)
BAD_RECORDS: list[tuple[bytes | None, bytes | None, str]] = [
    (None, b'{"x": [0.1, 0.2, 0.3]}', "missing_key"),
    (b"\xff\xfeseq", b'{"x": [0.1, 0.2, 0.3]}', "bad_key"),
    (b"seq-1", b'{"x": [0.1, 0.2', "bad_json"),
    (b"seq-2", b"\xc3\x28 not utf-8", "bad_json"),
    (b"seq-3", b"[0.1, 0.2, 0.3]", "not_object"),
    (b"seq-4", b'{"x": [0.1, 0.2]}', "wrong_width"),
    (b"seq-5", b'{"x": ["0.1", 0.2, 0.3]}', "bad_x"),
    (b"seq-6", b'{"x": [0.1, NaN, 0.3]}', "nonfinite"),
    (b"seq-7", b'{"x": [0.1, 0.2, 0.3], "end": "yes"}', "bad_field"),
    (b"seq-8", b'{"step": 3}', "missing_x"),
    (b"seq-9", b'{"x": [0.1, 0.2, 0.3], "pad": "' + b"a" * MAX_BYTES + b'"}', "too_large"),
    (b"seq-0", None, "not_object"),
]


def mixed_stream(seed: int) -> tuple[list[tuple[Any, Any]], Stream, dict[int, str], int]:
    """A valid interleaved stream with bad records and step duplicates spliced in.
    Returns the events, the valid stream re-indexed, {index: reason} of the bad
    ones, and the number of duplicates."""
    base = interleaved_stream(n_keys=12, n_events=500, features=3, seed=seed)
    rng = random.Random(seed)
    events: list[tuple[Any, Any]] = []
    kept = Stream(events=[])
    bad: dict[int, str] = {}
    duplicates = 0
    for i, event in enumerate(base.events):
        if rng.random() < 0.08:
            key, value, reason = rng.choice(BAD_RECORDS)
            bad[len(events)] = reason
            events.append((key, value))
        if i in base.segment_of:
            kept.segment_of[len(events)] = base.segment_of[i]
        events.append(event)
        fields = event[1]
        if "step" in fields and not fields.get("end") and not fields.get("start") and rng.random() < 0.05:
            events.append(event)  # a retried duplicate: same step again
            duplicates += 1
    kept.events = events
    kept.segments = base.segments
    return events, kept, bad, duplicates


def test_mixed_valid_and_invalid_records(kafka: LocalKafka, topics: TopicFactory) -> None:
    model = models.built("stacked_lstm_gru")
    names = topics({"in": 3, "out": 2, "dlq": 1})
    events, stream, bad, duplicates = mixed_stream(seed=17)
    placed = produce(kafka.bootstrap, names["in"], events)
    env = daemon_env(kafka.bootstrap, names, model, LSTMD_MAX_RECORD_BYTES=str(MAX_BYTES))
    daemon = DaemonProcess(env)
    try:
        port = int(daemon.wait_for("http_listening")["port"])
        out = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            settle=1.0,
            while_running=daemon,
        )
        dead = consume(kafka.bootstrap, names["dlq"], at_least=len(bad), settle=1.0)
        assert scrape(port, "/livez")[0] == 200
        assert scrape(port, "/readyz")[0] == 200
        text = scrape(port, "/metrics")[1]
    finally:
        assert daemon.stop() == 0
    check_predictions(model, stream, placed, out)

    by_source = {
        (int(dict(r.headers)["lstmd.source.partition"]), int(dict(r.headers)["lstmd.source.offset"])): r
        for r in dead
    }
    assert len(dead) == len(bad)
    for index, reason in bad.items():
        rec = by_source[placed[index]]
        headers = dict(rec.headers)
        assert headers["lstmd.error.class"].decode() == reason
        assert headers["lstmd.source.topic"].decode() == names["in"]
        assert headers["lstmd.error.reason"]
        key, value = events[index]
        assert (rec.key, rec.value) == (key, value), "not byte for byte"

    markers = sum(1 for k, v in events if isinstance(v, dict) and "x" not in v)
    consumed = metric(text, "lstmd_events_consumed_total")
    predicted = metric(text, "lstmd_predictions_produced_total")
    rejected = metric(text, "lstmd_records_rejected_total")
    skipped = metric(text, "lstmd_duplicates_skipped_total")
    assert (consumed, predicted, rejected, skipped) == (
        len(events),
        len(stream.predicted_events),
        len(bad),
        duplicates,
    )
    assert consumed == predicted + rejected + skipped + markers
    for reason in set(bad.values()):
        expected = sum(1 for r in bad.values() if r == reason)
        assert metric(text, f'lstmd_records_rejected_total{{reason="{reason}"}}') == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_broker_unreachable_at_start_then_up(kafka_broker_factory: Any) -> None:
    model = models.built("lstm_dense")
    port = _free_port()
    names = {"in": "events", "out": "predictions", "dlq": "events.dlq"}
    env = daemon_env(f"127.0.0.1:{port}", names, model)
    daemon = DaemonProcess(env)
    try:
        http = int(daemon.wait_for("http_listening")["port"])
        waiting = daemon.wait_for("kafka_unreachable")
        assert waiting["servers"] == [f"127.0.0.1:{port}"]
        assert scrape(http, "/readyz")[0] == 503
        assert scrape(http, "/livez")[0] == 200
        broker = kafka_broker_factory(port=port)
        create_topics(broker.bootstrap, {"events": 1, "predictions": 1, "events.dlq": 1})
        produce(broker.bootstrap, "events", [("a", {"x": [0.5]}), ("a", {"x": [0.25]})])
        out = consume(broker.bootstrap, "predictions", at_least=2, timeout=120, while_running=daemon)
        assert [orjson.loads(r.value)["n"] for r in out] == [1, 2]
        assert scrape(http, "/readyz")[0] == 200
    finally:
        assert daemon.stop() == 0


def test_missing_topic_exits_2_naming_it(kafka: LocalKafka, topics: TopicFactory) -> None:
    model = models.built("lstm_dense")
    names = topics({"out": 1, "dlq": 1}) | {"in": "no-such-input-topic"}
    env = daemon_env(kafka.bootstrap, names, model)
    env.pop("LSTMD_CREATE_TOPICS")
    daemon = DaemonProcess(env)
    assert daemon.proc.wait(timeout=120) == 2
    assert any("no-such-input-topic" in line and "LSTMD_CREATE_TOPICS" in line for line in daemon.lines), (
        "\n".join(daemon.lines[-5:])
    )


def test_a_state_topic_too_small_for_the_models_states_exits_2_naming_both_sizes(
    kafka: LocalKafka, topics: TopicFactory
) -> None:
    """Every checkpoint would be refused, forever: said once at start-up instead."""
    model = models.built("lstm_dense")
    names = topics({"in": 1, "out": 1, "dlq": 1}) | topics({"state": 1}, {"max.message.bytes": "200"})
    daemon = DaemonProcess(daemon_env(kafka.bootstrap, names, model))
    assert daemon.proc.wait(timeout=120) == 2
    served = load_model(model)
    needed = snapshot_bytes(str(served.identity), served.state_shapes) + STATE_RECORD_OVERHEAD_BYTES
    refusal = [line for line in daemon.lines if names["state"] in line and "max.message.bytes=200" in line]
    assert refusal and f"take up to {needed} bytes" in refusal[-1], "\n".join(daemon.lines[-5:])


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_dead_letters_too_large_for_their_topic_never_block_the_partition(
    kafka: LocalKafka, topics: TopicFactory, delivery: str
) -> None:
    """A record over 1 MiB is dead-lettered without its value (proactively); one the
    dead-letter topic refuses for its size (max.message.bytes 2 KiB here) is resent
    without it. The predictions behind them go on."""
    names = (
        topics({"in": 1}, {"max.message.bytes": str(8 << 20)})
        | topics({"out": 1})
        | topics({"dlq": 1}, {"max.message.bytes": "2048"})
    )
    model = models.built("lstm_dense")
    huge = b'{"x": [0.1], "pad": "' + b"a" * (2 << 20) + b'"}'
    # Incompressible: the daemon's producer compresses (LSTMD_KAFKA_COMPRESSION), and the
    # topic's limit applies to the compressed batch.
    bad = b'{"x": [0.1], "pad": "' + random.Random(3).randbytes(3000)
    events = [("a", {"x": [0.5]}), ("a", huge), ("a", bad), ("a", {"x": [0.25]})]
    produce(kafka.bootstrap, names["in"], events, max_request_size=8 << 20)
    daemon = DaemonProcess(daemon_env(kafka.bootstrap, names, model, LSTMD_DELIVERY=delivery))
    try:
        out = consume(kafka.bootstrap, names["out"], at_least=2, timeout=120, while_running=daemon)
        dead = consume(kafka.bootstrap, names["dlq"], at_least=2, settle=1.0)
        http = int(daemon.wait_for("http_listening")["port"])
        assert scrape(http, "/readyz")[0] == 200
    finally:
        assert daemon.stop() == 0
    assert [orjson.loads(r.value)["n"] for r in out] == [1, 2]
    got = [
        (r.key, r.value, dict(r.headers)["lstmd.error.class"], dict(r.headers)["lstmd.value.omitted"])
        for r in dead
    ]
    assert got == [
        (b"a", None, b"too_large", str(len(huge)).encode()),
        (b"a", None, b"bad_json", str(len(bad)).encode()),
    ]
    assert any(ev.get("event") == "dead_letter_value_omitted" for ev in daemon.events())


class _LateDescribe:
    """A real admin client that describes the topics as they were a moment ago:
    the window in which another pod creates them before this one does."""

    def __init__(self, admin: KafkaAdminClient, stale: set[str]) -> None:
        self._admin = admin
        self._stale = stale

    def describe_topics(self, names: list[str]) -> list[dict[str, Any]]:
        return [
            t | {"error_code": 3} if t["name"] in self._stale else t
            for t in self._admin.describe_topics(names)
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._admin, name)


def test_topics_created_meanwhile_by_another_pod_are_used(kafka: LocalKafka, topics: TopicFactory) -> None:
    names = topics({"in": 3, "out": 3})
    state = f"state-{names['in']}"
    create_topics(kafka.bootstrap, {state: 3})
    settings = Settings(
        kafka_bootstrap_servers=kafka.bootstrap,
        input_topic=names["in"],
        output_topic=names["out"],
        dlq_topic=f"dlq-{names['in']}",
        state_topic=state,
        model_path=models.built("lstm_dense"),
        group_id=f"group-{names['in']}",
        create_topics=True,
    )
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    try:
        racing = _LateDescribe(admin, stale={names["out"], state})
        assert ensure_topics(racing, settings) == 3  # type: ignore[arg-type]
        parts = {
            t["name"]: len(t["partitions"])
            for t in admin.describe_topics([names["out"], state, settings.dlq_topic])
        }
        assert parts == {names["out"]: 3, state: 3, settings.dlq_topic: 3}
    finally:
        admin.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / 100.0


def test_produce_failing_blocks_commits_without_spinning(kafka: LocalKafka, topics: TopicFactory) -> None:
    model = models.built("lstm_dense")
    names = topics({"in": 1, "dlq": 1}) | {"out": f"out-deleted-{time.monotonic_ns()}"}
    create_topics(kafka.bootstrap, {names["out"]: 1})
    env = daemon_env(kafka.bootstrap, names, model)
    env.pop("LSTMD_CREATE_TOPICS")
    env["LSTMD_STATE_TOPIC"] = names["in"] + ".state"
    create_topics(kafka.bootstrap, {env["LSTMD_STATE_TOPIC"]: 1}, {"cleanup.policy": "compact"})
    first = [("a", {"x": [0.1]}), ("a", {"x": [0.2]})]
    later = [("a", {"x": [0.3]}), ("b", {"x": [0.4]})]
    daemon = DaemonProcess(env)
    group = env["LSTMD_GROUP_ID"]
    tp = TopicPartition(names["in"], 0)
    try:
        daemon.wait_for("partition_restored")
        produce(kafka.bootstrap, names["in"], first)
        consume(kafka.bootstrap, names["out"], at_least=2, while_running=daemon)
        admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
        admin.delete_topics([names["out"]])
        time.sleep(2.0)
        produce(kafka.bootstrap, names["in"], later)
        # Either the producer keeps retrying (flush_slow) or it refuses the send for
        # want of metadata (produce_failed): both wait and retry, never commit.
        daemon.wait_for(("flush_slow", "produce_failed"), timeout=60)
        cpu_before, t0 = _cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(8.0)
        cpu_share = (_cpu_seconds(daemon.proc.pid) - cpu_before) / (time.monotonic() - t0)
        committed = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group)
        assert committed.committed(tp) == 2, "committed past undelivered predictions"
        committed.close()
        assert cpu_share < 0.5, f"retrying burns {cpu_share:.0%} of a core"
        create_topics(kafka.bootstrap, {names["out"]: 1})  # the topic comes back
        admin.close()
        out = consume(kafka.bootstrap, names["out"], at_least=2, timeout=120, while_running=daemon)
    finally:
        assert daemon.stop() == 0
    got = sorted((orjson.loads(r.value)["seq"], orjson.loads(r.value)["n"]) for r in out)
    assert got == [("a", 3), ("b", 1)]
