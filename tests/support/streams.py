"""Test streams and the checks every end-to-end test makes against the oracle.

A stream is a list of input events (key, value) produced in order. Its expected
predictions are derived here from the stream's own structure (which events
belong to which sequence) and the stateless oracle in tests/oracle.py; nothing
here consults the daemon's code.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from daemon.devtools.localkafka import LocalKafka, create_topics
from tests.oracle import assert_matches, expected_outputs_many

Event = tuple[str, dict[str, Any]]


@dataclass
class Stream:
    events: list[Event]
    # For each event with an x: (key, segment number, index within the segment)
    segment_of: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    segments: dict[tuple[str, int], list[list[float]]] = field(default_factory=dict)

    @property
    def predicted_events(self) -> list[int]:
        return sorted(self.segment_of)


def interleaved_stream(
    n_keys: int, n_events: int, features: int, seed: int = 0, *, key_prefix: str = "seq"
) -> Stream:
    """Many interleaved sequences of different lengths, keys reused after an end,
    pure end markers, explicit starts and `step` fields."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    stream = Stream(events=[])
    segment = dict.fromkeys((f"{key_prefix}-{i}" for i in range(n_keys)), 0)
    length = {k: rng.randint(2, 30) for k in segment}
    pos = dict.fromkeys(segment, 0)
    keys = list(segment)
    for i in range(n_events):
        key = rng.choice(keys)
        seg = (key, segment[key])
        r = rng.random()
        if r < 0.03 and pos[key] > 0:  # a pure end marker closes the segment
            stream.events.append((key, {"end": True}))
            segment[key] += 1
            pos[key] = 0
            continue
        start = r < 0.06 and pos[key] > 0
        if start:  # an explicit start opens a new segment
            segment[key] += 1
            pos[key] = 0
            seg = (key, segment[key])
        x = nprng.normal(size=features).round(4).tolist()
        end = pos[key] + 1 >= length[key]
        value: dict[str, Any] = {"x": x, "step": pos[key]}
        if start:
            value["start"] = True
        if end:
            value["end"] = True
        stream.events.append((key, value))
        stream.segment_of[i] = (key, seg[1], pos[key])
        stream.segments.setdefault(seg, []).append(x)
        pos[key] += 1
        if end:
            segment[key] += 1
            pos[key] = 0
            length[key] = rng.randint(2, 30)
    return stream


def produce(
    bootstrap: str, topic: str, events: Iterable[tuple[Any, Any]], pace: float = 0.0, **config: Any
) -> list[tuple[int, int]]:
    """Produce in order; return each event's (partition, offset). A str key is
    encoded, a dict value JSON-encoded; bytes and None go as they are. `config`
    goes to the KafkaProducer."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **config)
    futures = []
    for key, value in events:
        raw_key = key.encode() if isinstance(key, str) else key
        raw_value = orjson.dumps(value) if isinstance(value, dict) else value
        futures.append(producer.send(topic, key=raw_key, value=raw_value))
        if pace:
            time.sleep(pace)
    producer.flush()
    placed = [(m.partition, m.offset) for m in (f.get(timeout=30) for f in futures)]  # type: ignore[no-untyped-call]
    producer.close()
    return placed


def prediction_source(rec: Any) -> tuple[int, int] | None:
    """The input (partition, offset) a prediction answers; None for other records."""
    value = orjson.loads(rec.value)
    return (value["partition"], value["offset"]) if "y" in value else None


def consume(
    bootstrap: str,
    topic: str,
    *,
    at_least: int,
    timeout: float = 90.0,
    settle: float = 0.0,
    while_running: DaemonProcess | None = None,
    distinct: Callable[[Any], Hashable | None] | None = None,
) -> list[Any]:
    """Every record of a topic as a read_committed consumer sees it (no group).

    Returns once `at_least` records are in and no new one came for `settle` seconds,
    or when `timeout` passes. With `distinct`, `at_least` counts the distinct values
    it gives (None: not counted): at-least-once repeats must not end the wait early.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    parts = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in parts])
    consumer.seek_to_beginning()
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=200)
        for recs in batch.values():
            got.extend(recs)
            last_new = time.monotonic()
        have = len(got) if distinct is None else len({k for r in got if (k := distinct(r)) is not None})
        if have >= at_least and time.monotonic() - last_new >= settle:
            break
        if while_running is not None and while_running.proc.poll() is not None:
            raise AssertionError(
                f"the daemon exited ({while_running.proc.returncode}) with {len(got)} of "
                f"{at_least} records in; log tail:\n" + "\n".join(while_running.lines[-30:])
            )
    consumer.close()
    return got


def check_predictions(
    model_path: Path,
    stream: Stream,
    placed: list[tuple[int, int]],
    outputs: list[Any],
    *,
    exactly_once: bool = True,
    unchecked: frozenset[tuple[str, int]] = frozenset(),
    oracle: Callable[[Path, list[np.ndarray]], list[np.ndarray]] = expected_outputs_many,
) -> None:
    """Every event with an x has a prediction equal to the oracle (1e-5) carrying its
    partition and offset; with exactly_once, one and only one; repeated ones (at-least-
    once) bit-identical to each other. Segments in
    `unchecked` (key, segment) still need their predictions, but not their values.
    `oracle` evaluates the model file: tests/oracle.py's with Keras 3, or for a
    Keras 2 file tests/support/keras2_models.py's with Keras 2."""
    by_source: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for rec in outputs:
        value = orjson.loads(rec.value)
        assert rec.key == value["seq"].encode()
        if value.get("evicted"):
            continue
        by_source[(value["partition"], value["offset"])].append(value)
    wanted = {placed[i]: i for i in stream.predicted_events}
    missing = sorted(set(wanted) - set(by_source))
    assert not missing, f"{len(missing)} events without a prediction, e.g. {missing[:5]}"
    extra = sorted(set(by_source) - set(wanted))
    assert not extra, f"predictions for events that should have none: {extra[:5]}"
    checked = [seg for seg in stream.segments if seg not in unchecked]
    expected = dict(
        zip(
            checked,
            oracle(model_path, [np.asarray(stream.segments[seg], dtype=np.float32) for seg in checked]),
            strict=True,
        )
    )
    differing = [src for src, preds in by_source.items() if len({orjson.dumps(p["y"]) for p in preds}) > 1]
    repeated = sum(1 for preds in by_source.values() if len(preds) > 1)
    assert not differing, (
        f"{len(differing)} of {repeated} repeated predictions differ from their first copy "
        f"(repeats must be bit-identical), e.g. {differing[:5]}"
    )
    for source, i in wanted.items():
        preds = by_source[source]
        if exactly_once:
            assert len(preds) == 1, f"event {source} predicted {len(preds)} times"
        key, seg, t = stream.segment_of[i]
        for pred in preds:
            assert pred["seq"] == key, (pred, key)
            if (key, seg) not in unchecked:
                assert pred["n"] == t + 1, (pred, key, t)
                assert_matches(np.asarray(pred["y"]), expected[(key, seg)][t])


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    """GET one of the daemon's HTTP endpoints: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in an exposition (`name` may include labels)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def daemon_env(bootstrap: str, names: dict[str, str], model: Path, **extra: str) -> dict[str, str]:
    """The environment of a daemon on the test's topics: this process's without its
    LSTMD_ variables, but with its LSTMD_KAFKA_CLIENT (tests/conftest.py `kafka_client`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    env |= {
        "LSTMD_KAFKA_CLIENT": os.environ.get("LSTMD_KAFKA_CLIENT", "kafka-python"),
        "LSTMD_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "LSTMD_INPUT_TOPIC": names["in"],
        "LSTMD_OUTPUT_TOPIC": names["out"],
        "LSTMD_DLQ_TOPIC": names["dlq"],
        "LSTMD_STATE_TOPIC": names.get("state", f"state-{names['in']}"),
        "LSTMD_CREATE_TOPICS": "true",
        "LSTMD_GROUP_ID": f"group-{names['in']}",
        "LSTMD_MODEL_PATH": str(model),
        "LSTMD_HTTP_PORT": "0",
        "LSTMD_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "LSTMD_KAFKA_HEARTBEAT_INTERVAL_MS": "2000",
        "LSTMD_LOG_LEVEL": "INFO",
        # One process, whatever this machine's CPUs (the default): the tests of
        # several workers (tests/broker/test_kafka_e2e.py) ask for them.
        "LSTMD_WORKERS": "1",
    }
    return env | extra


class DaemonProcess:
    """`lstmd run` as a real subprocess; its JSON log lines are kept for assertions."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"],
            env=env | {"PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def events(self) -> Iterator[dict[str, Any]]:
        for line in list(self.lines):
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                continue

    def wait_for(self, event: str | tuple[str, ...], timeout: float = 90.0) -> dict[str, Any]:
        """The first log event named `event` (or any of several names)."""
        names = (event,) if isinstance(event, str) else event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if ev.get("event") in names:
                    return ev
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} log line; log tail:\n" + "\n".join(self.lines[-30:]))

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, and the exit code. A daemon still running after `timeout` is made to
        dump every thread's stack (SIGABRT: PYTHONFAULTHANDLER is set) into the
        assertion's log tail: where it hangs, not only that it does."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(timeout=30)
            self._reader.join(timeout=5)
            raise AssertionError(
                f"no exit {timeout} s after SIGTERM; log tail:\n" + "\n".join(self.lines[-150:])
            ) from None
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@dataclass
class OutageRun:
    """A broker of the test's own (it stops it) with the daemon's three topics, a
    stream produced to them, and a daemon serving it: what the broker-outage
    tests (tests/broker/test_faults.py, tests/broker/test_shutdown.py) stop the broker around."""

    broker: LocalKafka
    model: Path
    stream: Stream
    placed: list[tuple[int, int]]
    env: dict[str, str]
    daemon: DaemonProcess
    exactly_once: bool

    def predictions(self, while_running: DaemonProcess) -> list[Any]:
        """The predictions topic once every input has a prediction (repeats of
        at-least-once counted once), read while `while_running` serves."""
        return consume(
            self.broker.bootstrap,
            "predictions",
            at_least=len(self.stream.predicted_events),
            distinct=prediction_source,
            settle=2.0,
            timeout=150,
            while_running=while_running,
        )

    def check(self, outputs: list[Any]) -> None:
        check_predictions(self.model, self.stream, self.placed, outputs, exactly_once=self.exactly_once)


def outage_run(
    broker: LocalKafka, model: Path, *, delivery: str, n_keys: int, n_events: int, seed: int, **extra: str
) -> OutageRun:
    """Topics events (2 partitions), predictions and events.dlq on `broker`, an
    interleaved stream of 3 features produced to events, and a daemon (40 records a
    poll, `delivery`, `extra` variables) a second into serving it."""
    names = {"in": "events", "out": "predictions", "dlq": "events.dlq"}
    create_topics(broker.bootstrap, {"events": 2, "predictions": 1, "events.dlq": 1})
    stream = interleaved_stream(n_keys=n_keys, n_events=n_events, features=3, seed=seed)
    placed = produce(broker.bootstrap, "events", stream.events)
    env = daemon_env(
        broker.bootstrap, names, model, LSTMD_KAFKA_MAX_POLL_RECORDS="40", LSTMD_DELIVERY=delivery, **extra
    )
    daemon = DaemonProcess(env)
    try:
        daemon.wait_for("partition_restored")
    except BaseException:
        daemon.kill()
        raise
    time.sleep(1.0)
    return OutageRun(broker, model, stream, placed, env, daemon, exactly_once=delivery == "exactly-once")
