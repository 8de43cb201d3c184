"""Input written the way other clients write it: librdkafka (confluent-kafka) batches
compressed with every codec, a topic that compresses on its own (compression.type=zstd),
records kafka-python cannot write (null key and null value together, null header
values), and upstream transactions, one aborted and one committed. Against the real
broker; one daemon serves one topic holding all of it, and the tests below share it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, not declared so
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from daemon.devtools.localkafka import LocalKafka, create_topics
from tests.support import models
from tests.support.backends import CLIENTS
from tests.support.librdkafka import Writer
from tests.support.streams import (
    DaemonProcess,
    Stream,
    check_predictions,
    consume,
    daemon_env,
    interleaved_stream,
)

pytestmark = pytest.mark.kafka

CODECS = ("gzip", "snappy", "lz4", "zstd")
# A valid event's headers, as another client may set them: one with a null value.
HEADERS = [("trace-id", b"\x00\xffnot-utf8"), ("content-type", b"application/json"), ("empty", None)]
X = [0.25, -0.5, 1.0]

# Records the wire format refuses, as other clients write them: (key, value, headers,
# expected lstmd.error.class). kafka-python cannot send the null/null one.
BAD: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], str]] = [
    (None, None, [], "missing_key"),
    (None, None, [("trace-id", b"t-1"), ("nothing", None)], "missing_key"),
    (None, orjson.dumps({"x": X}), [("nothing", None)], "missing_key"),
    (b"", orjson.dumps({"x": X}), [], "missing_key"),
    (b"bad-null-value", None, [("nothing", None)], "not_object"),
    (b"\xff\xfe", orjson.dumps({"x": X}), [], "bad_key"),
    (b"bad-empty-value", b"", [], "bad_json"),
    (b"bad-binary", b"\x00\xff\xfe\x01", HEADERS, "bad_json"),
]


@dataclass
class Run:
    """What was written, where it landed, and what the daemon made of it."""

    model: Path
    names: dict[str, str]
    stream: Stream
    placed: list[tuple[int, int]]  # of every stream event, by index
    bad: dict[tuple[int, int], tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], str]]
    aborted: set[tuple[int, int]]
    committed: set[tuple[int, int]]  # stream events written in the committed transaction
    outputs: list[Any] = field(default_factory=list)
    dead: list[Any] = field(default_factory=list)
    exit_code: int | None = None
    log: list[dict[str, Any]] = field(default_factory=list)


def set_topic_compression(bootstrap: str, topic: str, codec: str) -> None:
    """The topic compresses every batch itself from now on (the broker recompresses)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("compression.type", codec, incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


@pytest.fixture(scope="module", params=CLIENTS)
def run(kafka: LocalKafka, request: pytest.FixtureRequest) -> Iterator[Run]:
    """The topic, written in turn by: a librdkafka producer of each codec (a sixth of
    the stream each, two bad records among them), a transaction that aborts, one that
    commits (lz4, the next sixth), and after the topic is set to compression.type=zstd,
    an uncompressed producer (the last sixth). Then one daemon serves it all, and is
    stopped with SIGTERM once every answer is in."""
    suffix = uuid.uuid4().hex[:8]
    names = {k: f"{k}-foreign-{suffix}" for k in ("in", "out", "dlq")}
    create_topics(kafka.bootstrap, {names["in"]: 3, names["out"]: 3, names["dlq"]: 1})
    model = models.built("stacked_lstm_gru")
    stream = interleaved_stream(n_keys=10, n_events=300, features=3, seed=29, key_prefix="foreign")
    parts = [list(range(i * 50, (i + 1) * 50)) for i in range(6)]  # stream indexes
    topic = names["in"]
    what: list[tuple[str, int]] = []  # by delivery tag: ("event", stream index) | ("bad", BAD index) | ...
    landed: dict[int, tuple[int, int]] = {}

    def write_events(writer: Writer, indexes: list[int], bad: Sequence[int] = ()) -> None:
        for j, i in enumerate(indexes):
            key, value = stream.events[i]
            what.append(("event", i))
            # every third event carries headers, one of them null-valued
            writer.write(
                topic, len(what) - 1, key.encode(), orjson.dumps(value), HEADERS if j % 3 == 0 else None
            )
            if j < len(bad):  # the bad records early in the part, among valid ones
                what.append(("bad", bad[j]))
                key_b, value_b, headers_b, _ = BAD[bad[j]]
                writer.write(topic, len(what) - 1, key_b, value_b, headers_b or None)

    for c, codec in enumerate(CODECS):
        writer = Writer(kafka.bootstrap, **{"compression.type": codec})
        write_events(writer, parts[c], bad=[2 * c, 2 * c + 1])
        landed |= writer.flush()

    tx = Writer(kafka.bootstrap, **{"transactional.id": f"upstream-{suffix}", "compression.type": "lz4"})
    tx.producer.init_transactions(30)
    tx.producer.begin_transaction()
    for k in range(20):  # never to be answered: keys no other record has
        what.append(("aborted", k))
        tx.write(topic, len(what) - 1, f"aborted-{k}".encode(), orjson.dumps({"x": X}))
    landed |= tx.flush()
    tx.producer.abort_transaction(30)
    tx.producer.begin_transaction()
    write_events(tx, parts[4])
    tx.producer.commit_transaction(30)
    landed |= tx.flush()

    set_topic_compression(kafka.bootstrap, topic, "zstd")
    plain = Writer(kafka.bootstrap, **{"compression.type": "none"})
    write_events(plain, parts[5])
    landed |= plain.flush()

    assert len(landed) == len(what), "a record was not acknowledged"
    placed = [(0, 0)] * len(stream.events)
    bad: dict[tuple[int, int], Any] = {}
    aborted: set[tuple[int, int]] = set()
    for tag, (kind, i) in enumerate(what):
        if kind == "event":
            placed[i] = landed[tag]
        elif kind == "bad":
            bad[landed[tag]] = BAD[i]
        else:
            aborted.add(landed[tag])
    result = Run(model, names, stream, placed, bad, aborted, committed={placed[i] for i in parts[4]})

    # Once per client library (LSTMD_KAFKA_CLIENT): the module's tests read each run.
    daemon = DaemonProcess(daemon_env(kafka.bootstrap, names, model, LSTMD_KAFKA_CLIENT=request.param))
    try:
        result.outputs = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            settle=2.0,
            timeout=120,
            while_running=daemon,
        )
        result.dead = consume(kafka.bootstrap, names["dlq"], at_least=len(bad), settle=1.0, timeout=60)
    finally:
        result.exit_code = daemon.stop()
        result.log = list(daemon.events())
    yield result


def test_every_codec_and_the_topics_own_is_read_and_answered_as_the_oracle_says(run: Run) -> None:
    """gzip, snappy, lz4 and zstd batches from librdkafka, and batches the topic
    recompressed with zstd: every event answered once, as the oracle says."""
    check_predictions(run.model, run.stream, run.placed, run.outputs)


def test_records_other_clients_write_are_dead_lettered_unchanged(run: Run) -> None:
    """Each bad record once, with its reason, its key and value bytes and its headers
    (a null header value as empty); the null/null one with an empty value marked null."""
    by_source: dict[tuple[int, int], Any] = {}
    for rec in run.dead:
        headers = dict(rec.headers)
        source = (int(headers["lstmd.source.partition"]), int(headers["lstmd.source.offset"]))
        assert source not in by_source, f"{source} dead-lettered twice"
        by_source[source] = rec
    assert set(by_source) == set(run.bad)
    for source, (key, value, written, reason) in run.bad.items():
        rec = by_source[source]
        got = dict(rec.headers)
        assert got["lstmd.error.class"] == reason.encode()
        assert got["lstmd.source.topic"] == run.names["in"].encode()
        carried = [(n, v if v is not None else b"") for n, v in written]
        assert rec.headers[: len(carried)] == carried
        assert rec.key == key
        if key is None and value is None:
            assert rec.value == b"" and got["lstmd.value.null"] == b"true"
        else:
            assert rec.value == value and "lstmd.value.null" not in got


def test_upstream_transactions_aborted_never_answered_committed_once(run: Run) -> None:
    answered: dict[tuple[int, int], int] = {}
    for rec in run.outputs:
        value = orjson.loads(rec.value)
        source = (value["partition"], value["offset"])
        answered[source] = answered.get(source, 0) + 1
    dead = {
        (int(dict(r.headers)["lstmd.source.partition"]), int(dict(r.headers)["lstmd.source.offset"]))
        for r in run.dead
    }
    assert not run.aborted & (set(answered) | dead)
    assert not any(rec.key and rec.key.startswith(b"aborted-") for rec in [*run.outputs, *run.dead])
    assert len(run.committed) == 50
    assert {answered.get(s) for s in run.committed if s in answered} == {1}
    predicted = {run.placed[i] for i in run.stream.predicted_events}
    assert run.committed & predicted <= set(answered)


def test_the_daemon_ran_through_it_and_stopped_cleanly(run: Run) -> None:
    assert run.exit_code == 0
    fatal = [ev for ev in run.log if ev.get("event") == "fatal" or ev.get("level") in ("critical",)]
    assert not fatal, fatal
    assert not [ev for ev in run.log if ev.get("event") == "send_refused"]
