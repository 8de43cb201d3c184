"""`lstmd bench`: tiny smoke runs; the structure of the report, never its speeds."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.core.records import StateRecord
from daemon.devtools import bench
from daemon.devtools.bench.broker import cpu_s_per_million, peak_rss_mib, tree, tree_cpu_seconds, workers
from daemon.devtools.bench.config import versus_contenders
from daemon.devtools.bench.latency import Paced, latency_row, percentiles
from daemon.devtools.bench.peer import PEER_SCRIPT, PeerSection, has_quix
from daemon.devtools.bench.profile import PHASE_RULES, classify
from daemon.devtools.bench.versus import (
    Contenders,
    Outcome,
    client_missing,
    format_versus,
    lstmd_env,
    versus_row,
    versus_table,
)
from daemon.devtools.localkafka import LocalKafka
from daemon.streaming.policy import Checkpoint
from tests.support.backends import memory_delivery, memory_kafka, memory_member
from tests.support.fakes import output, settings

TINY = bench.BenchConfig(
    sections=("engine",),
    models=("demo",),
    sequences=(1, 3),
    rounds=2,
    events=6,
    keras_events=2,
    min_round_s=0.0,
)


def test_report_structure() -> None:
    messages: list[str] = []
    report = bench.run(TINY, log=messages.append)
    rows = report["rows"]
    assert [(r["engine"], r["sequences"]) for r in rows] == [
        ("keras", 1),
        ("keras", 3),
        ("fast", 1),
        ("fast", 3),
    ]
    for r in rows:
        assert r["section"] == "engine" and r["model"] == "demo"
        assert r["requested"] == r["engine"] and r["note"] == ""
        assert r["rounds"] == 2
        # whole waves of `sequences` events: at least one, at least the budget
        budget = TINY.keras_events if r["engine"] == "keras" else TINY.events
        assert r["events"] % r["sequences"] == 0 and r["events"] >= max(budget, r["sequences"])
        assert r["events_per_s"] > 0
        assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"]
        assert r["vs_keras"] is not None and r["vs_keras"] > 0
    assert all(r["vs_keras"] == 1.0 for r in rows if r["engine"] == "keras")
    assert report["meta"]["config"]["rounds"] == 2
    assert "demo" in report["meta"]["models"]
    assert len(messages) == 4
    table = bench.format_table(report)
    assert "events/s" in table and "vs keras" in table and "demo" in table
    assert len(table.splitlines()) >= 1 + len(rows)


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "bench",
            "--json",
            "--sections",
            "engine",
            "--models",
            "demo",
            "--engines",
            "fast",
            "--sequences",
            "2",
            "--rounds",
            "1",
            "--events",
            "4",
            "--min-round-seconds",
            "0",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["rows"]
    assert row["engine"] == "fast" and row["sequences"] == 2 and row["events"] == 4
    assert row["vs_keras"] is None  # no keras row to compare with


def test_cli_refuses_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--models", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", "--engines", "keras,turbo"]) == 2
    assert main(["bench", "--sections", "kafka"]) == 2


def test_ratios_pair_rows_by_section_model_and_sequences() -> None:
    rows = [
        {
            "section": "e2e",
            "model": "m",
            "sequences": 4,
            "engine": "keras",
            "requested": "keras",
            "events_per_s": 100.0,
        },
        {
            "section": "e2e",
            "model": "m",
            "sequences": 4,
            "engine": "passthrough",
            "requested": "passthrough",
            "events_per_s": 1000.0,
        },
        {
            "section": "e2e",
            "model": "m",
            "sequences": 8,
            "engine": "fast",
            "requested": "fast",
            "events_per_s": 50.0,
        },
    ]
    bench.add_ratios(rows)
    assert [r["vs_keras"] for r in rows] == [1.0, 10.0, None]


@pytest.mark.kafka
def test_e2e_and_profile_structure(kafka: LocalKafka) -> None:
    """A few events through the session broker: pass-through, keras, fast, then the
    profile's round; batches of 10 so every contender has a timing window."""
    config = bench.BenchConfig(
        sections=("e2e", "profile"),
        e2e_events=60,
        e2e_keras_events=20,
        e2e_sequences=5,
        e2e_partitions=2,
        e2e_rounds=1,
        e2e_max_poll_records=10,
        e2e_pod=False,  # `lstmd run` as a subprocess: tests/broker/test_kafka_e2e.py runs it with two workers
        bootstrap=kafka.bootstrap,
    )
    messages: list[str] = []
    report = bench.run(config, log=messages.append)
    rows = [r for r in report["rows"] if r["section"] == "e2e"]
    assert [r["requested"] for r in rows] == ["passthrough", "keras", "fast"]
    assert [r["engine"] for r in rows] == ["passthrough", "keras", "fast"]
    for r in rows:
        assert r["note"] == "", r["note"]
        assert r["model"] == "demo" and r["sequences"] == 5 and r["rounds"] == 1
        budget = 20 if r["engine"] == "keras" else 60
        # the inputs of batches 2..K: at least what is left of the budget after one batch
        assert budget - 10 <= r["events"] <= 60
        assert r["events_per_s"] > 0 and r["broker_events_per_s"] is not None
        assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"]
        assert r["vs_keras"] is not None and r["vs_passthrough"] is not None
    assert rows[0]["vs_passthrough"] == 1.0 and rows[1]["vs_keras"] == 1.0
    summary = report["summary"]
    assert summary["fast_vs_passthrough"] is not None and summary["fast_vs_keras"] is not None
    assert summary["fast_vs_peer"] is None  # no peer in this run
    profile = [r for r in report["rows"] if r["section"] == "profile"]
    total = profile[-1]
    assert total["phase"] == "(total)" and total["events"] > 0 and total["us_per_event"] > 0
    phases = profile[:-1]
    assert phases and all(r["us_per_event"] >= 0 and 0 <= r["share"] <= 1 for r in phases)
    assert abs(sum(r["share"] for r in phases) - 1.0) < 1e-9
    assert "e2e" in report["meta"] and report["meta"]["config"]["bootstrap"] == kafka.bootstrap
    table = bench.format_table(report)
    assert "passthrough" in table and "broker ev/s" in table and "fast/passthrough" in table
    assert "us/event" in table
    json.dumps(report)  # --json can print it
    assert any("e2e round 1/1 fast" in m for m in messages)


def test_peer_is_skipped_with_the_reason_when_quixstreams_is_unavailable() -> None:
    config = bench.BenchConfig(sections=("peer",), peer_python=sys.executable, e2e_sequences=7)
    if has_quix(sys.executable):
        pytest.skip("this interpreter has quixstreams")
    (row,) = PeerSection().run(config, log=lambda _msg: None)
    assert row["section"] == "peer" and row["engine"] == "quix" and row["sequences"] == 7
    assert row["note"].startswith("skipped: ") and "quixstreams" in row["note"]
    assert row["events_per_s"] == 0.0 and row["broker_events_per_s"] is None


def test_the_peer_application_is_where_the_bench_runs_it_from() -> None:
    assert PEER_SCRIPT.is_file()


def test_the_profile_phases_name_files_that_exist() -> None:
    root = Path(bench.__file__).parents[3]
    paths = {suffix for suffix, *_ in PHASE_RULES if suffix.startswith("daemon/")}
    assert paths and [p for p in sorted(paths) if not (root / p).exists()] == []


def test_bench_options() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    default = bench.config_from_args(parser.parse_args([]))
    assert default.sections == ("engine", "e2e")
    config = bench.config_from_args(
        parser.parse_args(
            [
                "--sections",
                "e2e",
                "--peer",
                "--profile",
                "--e2e-events",
                "50",
                "--e2e-rounds",
                "2",
                "--e2e-max-poll-records",
                "7",
                "--bootstrap",
                "127.0.0.1:9092",
            ]
        )
    )
    assert config.sections == ("e2e", "peer", "profile")
    assert (config.e2e_events, config.e2e_rounds, config.e2e_max_poll_records) == (50, 2, 7)
    assert config.bootstrap == "127.0.0.1:9092"
    with pytest.raises(ValueError, match="kafka"):
        bench.config_from_args(parser.parse_args(["--sections", "kafka"]))
    assert bench.main(["--sections", "nope"]) == 2
    versus = bench.config_from_args(
        parser.parse_args(["--sections", "e2e", "--versus", "--versus-events", "9", "--latency-rounds", "2"])
    )
    assert versus.sections == ("e2e", "latency", "versus")
    assert (versus.versus_events, versus.latency_rounds, versus.versus_processes) == (9, 2, (1, 2))
    assert versus.versus_clients == ("kafka-python", "confluent-kafka")
    assert versus.latency_contenders == ("lstmd", "lstmd-librdkafka", "quix")
    with pytest.raises(ValueError, match="latency contenders flink"):
        bench.config_from_args(parser.parse_args(["--versus", "--latency-contenders", "lstmd,flink"]))
    one = bench.config_from_args(parser.parse_args(["--versus", "--versus-clients", "confluent-kafka"]))
    assert one.versus_clients == ("confluent-kafka",)
    with pytest.raises(
        ValueError, match="unknown Kafka clients aiokafka; known: kafka-python, confluent-kafka"
    ):
        bench.config_from_args(parser.parse_args(["--versus", "--versus-clients", "kafka-python,aiokafka"]))


def test_summary_ratios() -> None:
    def row(section: str, requested: str, eps: float, broker: float | None) -> bench.Row:
        return {
            "section": section,
            "model": "demo",
            "sequences": 10,
            "engine": requested,
            "requested": requested,
            "events_per_s": eps,
            "broker_events_per_s": broker,
        }

    rows = [
        row("e2e", "passthrough", 100.0, 90.0),
        row("e2e", "keras", 10.0, 9.0),
        row("e2e", "fast", 80.0, 60.0),
        row("peer", "quix", 120.0, 120.0),
        row("e2e", "pod", 150.0, 150.0),
        row("e2e", "pod-1", 96.0, 96.0),
    ]
    bench.add_ratios(rows)
    assert rows[3]["vs_passthrough"] == 1.2 and rows[2]["vs_keras"] == 8.0
    s = bench.summary(rows)
    assert s["fast_vs_passthrough"] == 0.8 and s["fast_vs_keras"] == 8.0
    assert s["fast_vs_peer"] == 80.0 / 120.0 and s["fast_vs_peer_broker_timed"] == 0.5
    assert s["passthrough_vs_peer_broker_timed"] == 0.75
    assert s["pod_vs_peer_broker_timed"] == 1.25 and s["pod_1_vs_passthrough_broker_timed"] == 96.0 / 90.0
    assert s["pod_vs_peer_per_cpu_second"] is None  # no CPU figures in these rows
    rows[3]["cpu_us_per_event"], rows[5]["cpu_us_per_event"] = 60.0, 80.0
    assert bench.summary(rows)["pod_1_vs_peer_per_cpu_second"] == 0.75


# -- at scale (issue 12): the sections' machinery at tiny sizes, never their speeds ----------

TINY_SCALE = bench.BenchConfig(
    sections=("scale", "keras-overhead"),
    models=("demo",),
    scale_rounds=2,
    scale_sequences=40,
    scale_baseline_sequences=4,
    scale_events=60,
    scale_batch=25,
    overhead_sequences=3,
    overhead_events=6,
)


def test_scale_and_keras_overhead_structure() -> None:
    messages: list[str] = []
    report = bench.run(TINY_SCALE, log=messages.append)
    scale = [r for r in report["rows"] if r["section"] == "scale"]
    assert [r["interleaved"] for r in scale] == [4, 40]
    for r in scale:
        assert r["engine"] == "fast" and r["model"] == "demo" and r["note"] == ""
        assert r["open_sequences"] == r["interleaved"]  # one state per sequence, none evicted
        assert r["events"] == 60 and r["batch"] == 25 and r["rounds"] == 2
        assert r["events_per_s"] > 0 and len(r["events_per_s_each"]) == 2
        assert 0 < r["batch_p50_ms"] <= r["batch_p99_ms"]
        assert r["vs_baseline"] is not None and r["vs_baseline"] > 0
        assert "vs_keras" not in r  # its own ratio, not add_ratios'
    assert scale[0]["vs_baseline"] == 1.0
    overhead = [r for r in report["rows"] if r["section"] == "keras-overhead"]
    assert [(r["engine"], r["interleaved"]) for r in overhead] == [
        ("engine", 1),
        ("loop", 1),
        ("loop + read back", 1),
        ("engine", 3),
        ("loop", 3),
        ("loop, no swap", 3),
    ]
    for r in overhead:
        assert r["events"] == 6 and r["events_per_s"] > 0 and r["us_per_event"] > 0 and r["vs_loop"] > 0
    for r in (r for r in overhead if r["engine"] == "engine"):
        assert r["overhead"] > -1.0 and isinstance(r["target_met"], bool) and len(r["overhead_each"]) == 2
        assert r["profile"] and all(p["us_per_event"] >= 0 and 0 <= p["share"] <= 1 for p in r["profile"])
        parts = {b["part"]: b for b in r["breakdown"]}
        assert (
            parts["KerasEngine.step (all)"]["share"] == 1.0 and parts["predict_on_batch"]["us_per_event"] > 0
        )
        assert parts["state read-back"]["us_per_event"] > 0
    assert all(r["vs_loop"] == 1.0 for r in overhead if r["engine"] == "loop")
    table = bench.format_table(report)
    assert "interleaved" in table and "vs baseline" in table and "overhead" in table
    assert "vs keras" not in table  # no throughput rows of the engine or e2e sections
    json.dumps(report)
    assert any("keras-overhead demo x3 round 2/2" in m for m in messages)


def test_memory_paths_and_rows() -> None:
    from daemon.devtools.bench.memory import measure_here, measure_in_child, memory_row

    restored = measure_in_child("restored", "demo", 20_000, 500, 0)  # a fresh process
    processed = measure_here("processed", "demo", 60, batch=25)
    for how, m in (("restored", restored), ("processed", processed)):
        row = memory_row(how, "demo", m)
        assert row["section"] == "memory" and row["engine"] == how
        assert row["tensor_bytes_per_sequence"] == 2 * 32 * 4  # LSTM(32): h and c, float32
        assert row["record_bytes"] > row["tensor_bytes_per_sequence"]  # a header too
        assert m["rss_before"] > 0 and m["rss_after"] > 0
    row = memory_row("restored", "demo", restored)
    assert row["open_sequences"] == 20_000 and row["bytes_per_sequence"] > 0 and row["vs_tensor_bytes"] > 0
    report = {"rows": [row], "meta": {}}
    from daemon.devtools.bench.scale_report import format_scale

    assert any("bytes/seq" in line for line in format_scale(report))


def test_restore_snapshots_are_what_the_restorer_adopts() -> None:
    from daemon.core.state import SequenceState, StateStore
    from daemon.devtools.bench.restore import snapshots
    from daemon.streaming.restore import adopt

    records = snapshots([(3,), (3,)], "m@abc", 5, seed=0)
    states = {f"s{i}": SequenceState.from_snapshot(raw) for i, raw in enumerate(records)}
    store = StateStore(0)
    assert adopt(store, "m@abc", 0, states, [(3,), (3,)]) == []
    assert len(store) == 5 and store.state_bytes() == 5 * 2 * 3 * 4


def test_scale_options() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    config = bench.config_from_args(
        parser.parse_args(
            ["--sections", "engine", "--scale", "--memory-counts", "10,20", "--scale-rounds", "2"]
        )
    )
    assert config.sections == ("engine", "restore", "memory", "scale", "keras-overhead", "rebuild")
    assert config.memory_counts == (10, 20) and config.scale_rounds == 2
    with pytest.raises(ValueError):
        bench.config_from_args(parser.parse_args(["--memory-counts", "0"]))


@pytest.mark.kafka
def test_restore_structure(kafka: LocalKafka) -> None:
    config = bench.BenchConfig(
        sections=("restore",), models=("demo",), restore_states=30, scale_rounds=1, bootstrap=kafka.bootstrap
    )
    report = bench.run(config)
    rows = report["rows"]
    assert [r["engine"] for r in rows] == ["raw read", "restorer"]
    for r in rows:
        assert r["states"] == 30 and r["states_per_s"] > 0 and r["seconds"] > 0 and r["record_bytes"] > 256
        assert r["vs_raw_read"] is not None and r["vs_raw_read"] > 0
    assert rows[0]["vs_raw_read"] == 1.0
    assert "extrapolated from 30" in rows[1]["target"] and isinstance(rows[1]["target_met"], bool)
    assert "states/s" in bench.format_table(report)


def test_rebuild_section_structure() -> None:
    config = bench.BenchConfig(
        sections=("rebuild",),
        scale_rounds=1,
        rebuild_sequences=30,
        rebuild_steps=4,
        rebuild_keras_sequences=3,
        rebuild_keras_steps=2,
        rebuild_broker_sequences=0,  # the Rebuilder over a broker: tests/broker/test_model_change.py
    )
    report = bench.run(config)
    rows = report["rows"]
    assert [(r["engine"], r["contender"], r["events"], r["extrapolated"]) for r in rows] == [
        ("keras", "live", 6, True),
        ("keras", "rebuild", 6, True),
        ("fast", "live", 120, False),
        ("fast", "rebuild", 120, False),
    ]
    for r in rows:
        assert r["events_per_s"] > 0 and r["target_events"] == 120
        assert r["target_seconds"] == pytest.approx(120 / r["events_per_s"])
    assert [r["vs_live"] for r in rows if r["contender"] == "live"] == [1.0, 1.0]
    table = bench.format_table(report)
    assert "s for target" in table and "(extrapolated)" in table


def test_shadow_section_structure() -> None:
    config = bench.BenchConfig(
        sections=("shadow",), shadow_rounds=1, shadow_sequences=12, shadow_keras_sequences=2, shadow_steps=3
    )
    report = bench.run(config)
    rows = report["rows"]
    assert [(r["engine"], r["contender"], r["events"]) for r in rows] == [
        ("keras", "serving", 6),
        ("keras", "serving + shadow", 6),
        ("fast", "serving", 36),
        ("fast", "serving + shadow", 36),
    ]
    assert [r["vs_serving"] for r in rows if r["contender"] == "serving"] == [1.0, 1.0]
    # The shadow's states: the demo model's LSTM(32), h and c of float32, per open sequence.
    assert [r["shadow_state_bytes"] for r in rows] == [0, 2 * 2 * 32 * 4, 0, 12 * 2 * 32 * 4]
    assert "shadow model RSS" in bench.format_table(report)


@pytest.mark.kafka
@pytest.mark.parametrize("contender", ["lstmd", "lstmd-librdkafka"])
def test_latency_section_measures_every_paced_event(kafka: LocalKafka, contender: str) -> None:
    """A short steady stream through `lstmd run` with each Kafka client backend:
    every paced event has a prediction and a latency."""
    config = bench.BenchConfig(
        sections=("latency",),
        versus_sequences=5,
        versus_partitions=2,
        latency_rate=100,
        latency_seconds=2.0,
        latency_rounds=1,
        latency_contenders=(contender,),  # `lstmd run`, one process; the peer needs its own venv
        bootstrap=kafka.bootstrap,
    )
    report = bench.run(config)
    (row,) = report["rows"]
    assert row["section"] == "latency" and row["rounds"] == 1, row["note"]
    assert (row["requested"], row["processes"], row["model"]) == (contender, 1, "lstm16x5")
    assert row["events"] == 200  # every paced event, none of the warm-up
    assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"] <= row["latency_max_ms"]
    assert row["note"].startswith("per event") and ";" not in row["note"]
    assert row["cpu_s_per_million_events"] > 0 and row["worker_peak_rss_mib"] > 0
    assert [x[contender] for x in report["versus"][:3]] == [
        row["latency_p50_ms"],
        row["latency_p99_ms"],
        row["latency_max_ms"],
    ]
    assert list(report["versus"][0]) == ["figure", contender, "quix", f"{contender}_vs_quix"]


@pytest.mark.kafka
def test_compression_section_structure(kafka: LocalKafka) -> None:
    """Every codec of LSTMD_KAFKA_COMPRESSION through the daemon's producer settings:
    each compresses the daemon's predictions below their uncompressed size on the broker."""
    config = bench.BenchConfig(
        sections=("compression",), compression_events=300, compression_rounds=1, bootstrap=kafka.bootstrap
    )
    report = bench.run(config)
    rows = {r["engine"]: r for r in report["rows"]}
    assert list(rows) == ["none", "gzip", "snappy", "lz4", "zstd"]
    none = rows["none"]
    assert none["vs_none"] == none["wire_vs_none"] == none["cpu_vs_none"] == 1.0
    # Uncompressed, a record costs its key and value plus the record and batch framing.
    assert none["wire_bytes_per_record"] > none["record_bytes"] > 100
    for name in ("gzip", "snappy", "lz4", "zstd"):
        r = rows[name]
        assert r["events"] == 300 and len(r["each"]) == 1
        assert r["wire_bytes_per_record"] < 0.6 * none["wire_bytes_per_record"], name
        assert r["records_per_s"] > 0 and r["cpu_us_per_record"] > 0
    table = bench.format_table(report)
    assert "wire B/rec" in table and "vs keras" not in table


def test_the_profile_names_the_sends_of_outputs_and_of_state_records(tmp_path: Path) -> None:
    """Each producer.send of a checkpoint is named by what it sends (the rules once
    named none: every send was "checkpoint other")."""
    named: list[tuple[str, str]] = []

    def name(topic: str, key: bytes | None, value: bytes | None) -> None:
        named.append((topic, classify(sys._getframe())))  # called inside producer.send

    s = settings(tmp_path)
    kafka = memory_kafka(s)
    kafka.refuse_sends = name
    cp = memory_delivery(kafka, s)
    cp.send([output(value=b"1")])
    consumer = memory_member(kafka, s)
    cp.commit(consumer, Checkpoint(outputs=[output(value=b"2")], states=[StateRecord(0, "k", b"s")]))
    outputs, states = "producer.send (outputs)", "producer.send (state records)"
    assert named == [("out", outputs), ("out", outputs), ("g.state", states)]


# -- lstmd versus the Quix peer (issue 19): the figures' arithmetic on fixed inputs ----------


def test_latency_percentiles_and_the_medians_over_rounds() -> None:
    """p50 / p99 / max per round (NumPy's linear percentiles), then medians of rounds."""
    assert percentiles([float(v) for v in range(1, 101)]) == (50.5, 99.01, 100.0)
    assert percentiles([4.0, 1.0, 3.0, 2.0]) == pytest.approx((2.5, 3.97, 4.0), rel=1e-12, abs=0)
    config = bench.BenchConfig(versus_sequences=7, latency_rate=50)
    rounds = [
        Paced(
            outcome=Outcome(cpu_s_per_million=30.0, worker_peak_rss_mib=[100.0]), latencies=[1.0, 2.0, 3.0]
        ),
        Paced(outcome=Outcome(cpu_s_per_million=10.0, worker_peak_rss_mib=[300.0]), latencies=[5.0, 5.0]),
        Paced(error="quix exited with code 1: boom"),
        Paced(
            outcome=Outcome(cpu_s_per_million=20.0, worker_peak_rss_mib=[200.0]), latencies=[7.0, 9.0, 11.0]
        ),
    ]
    row = latency_row("latency", "quix", rounds, config)
    # p50s 2, 5, 9; p99s 2.98, 5, 10.96; maxima 3, 5, 11: the medians of the three rounds that completed
    assert (row["latency_p50_ms"], row["latency_p99_ms"], row["latency_max_ms"]) == (5.0, 5.0, 5.0)
    assert row["rounds"] == 3 and row["events"] == 3 and row["events_per_s"] == 50.0
    assert (row["cpu_s_per_million_events"], row["worker_peak_rss_mib"]) == (20.0, 200.0)
    assert row["per_round"]["latency_p50_p99_max_ms"] == [
        [2.0, 2.98, 3.0],
        [5.0, 5.0, 5.0],
        [9.0, 10.96, 11.0],
    ]
    assert row["note"].endswith("; quix exited with code 1: boom")


def test_cpu_and_peak_rss_accounting_over_process_trees() -> None:
    """CPU: the roots and all their descendants; RSS: per worker, the tree's leaves."""
    procs = {
        1: (0, 500.0),  # init: not a contender's
        10: (1, 2.0),  # lstmd's supervisor
        11: (10, 30.5),  # its workers
        12: (10, 29.5),
        13: (12, 1.0),  # a worker's child
        20: (1, 40.0),  # a peer process, alone
        21: (1, 41.0),  # another one in the same group
        30: (1, 7.0),  # someone else's
    }
    assert tree(procs, [10]) == {10, 11, 12, 13}
    assert tree(procs, [20, 21, 99]) == {20, 21}  # 99: gone
    assert tree_cpu_seconds(10, procs) == 63.0
    assert tree_cpu_seconds([20, 21], procs) == 81.0
    assert tree_cpu_seconds(99, procs) is None
    assert workers(procs, tree(procs, [10])) == {11, 13}
    assert workers(procs, tree(procs, [20])) == {20}
    # CPU seconds per million events = CPU microseconds per event, between two samples
    assert cpu_s_per_million((1_000, 12.0), (151_000, 15.0)) == 20.0
    assert cpu_s_per_million((5, 1.0), (5, 2.0)) is None
    rss = peak_rss_mib(os.getpid())
    assert rss is not None and rss > 1.0
    assert peak_rss_mib(-1) is None


def test_versus_rows_and_the_table() -> None:
    """Per contender and process count: medians of the rounds; the table has a
    column per lstmd backend and the peer's, and divides each backend's figure by
    the peer's."""
    config = bench.BenchConfig(versus_events=1000)

    def outcomes(*figures: tuple[float, float, list[float]]) -> list[Outcome]:
        return [Outcome(events_per_s=e, cpu_s_per_million=c, worker_peak_rss_mib=m) for e, c, m in figures]

    rows = [
        versus_row(
            "versus",
            "lstmd",
            1,
            outcomes((100.0, 50.0, [700.0]), (80.0, 70.0, [710.0]), (90.0, 60.0, [690.0])),
            config,
        ),
        versus_row(
            "versus",
            "lstmd-librdkafka",
            1,
            outcomes((200.0, 20.0, [650.0]), (240.0, 25.0, [660.0]), (180.0, 30.0, [640.0])),
            config,
        ),
        versus_row(
            "versus",
            "quix",
            1,
            outcomes((120.0, 40.0, [90.0]), (110.0, 45.0, [100.0]), (130.0, 35.0, [95.0])),
            config,
        ),
        versus_row("versus", "lstmd", 2, outcomes((150.0, 80.0, [600.0, 720.0])), config),
        versus_row("versus", "lstmd-librdkafka", 2, outcomes((300.0, 32.0, [610.0, 620.0])), config),
        versus_row("versus", "quix", 2, [Outcome(error="quix timed out after 180 s")], config),
        {
            "section": "latency",
            "requested": "lstmd",
            "processes": 1,
            "latency_p50_ms": 20.0,
            "latency_p99_ms": 100.0,
        },
        {
            "section": "latency",
            "requested": "lstmd-librdkafka",
            "processes": 1,
            "latency_p50_ms": 4.0,
            "latency_p99_ms": 10.0,
        },
        {
            "section": "latency",
            "requested": "quix",
            "processes": 1,
            "latency_p50_ms": 5.0,
            "latency_p99_ms": 40.0,
        },
    ]
    assert (rows[0]["events_per_s"], rows[0]["cpu_s_per_million_events"], rows[0]["worker_peak_rss_mib"]) == (
        90.0,
        60.0,
        700.0,
    )
    assert rows[0]["per_round"]["events_per_s"] == [100.0, 80.0, 90.0]
    assert (rows[0]["engine"], rows[1]["engine"]) == (
        "lstmd run (fast, kafka-python)",
        "lstmd run (fast, confluent-kafka)",
    )
    assert rows[3]["worker_peak_rss_mib"] == 720.0  # the larger worker
    assert (
        rows[5]["rounds"] == 0
        and rows[5]["events_per_s"] is None
        and rows[5]["note"] == "quix timed out after 180 s"
    )
    lines = versus_table(rows)
    assert list(lines[0]) == [
        "figure",
        "lstmd",
        "lstmd-librdkafka",
        "quix",
        "lstmd_vs_quix",
        "lstmd-librdkafka_vs_quix",
    ]
    table = {x["figure"]: tuple(list(x.values())[1:]) for x in lines}
    assert table["latency at a steady rate, p50 ms (one process each)"] == (20.0, 4.0, 5.0, 4.0, 0.8)
    assert table["latency at a steady rate, p99 ms (one process each)"] == (100.0, 10.0, 40.0, 2.5, 0.25)
    assert table["latency at a steady rate, max ms (one process each)"] == (None, None, None, None, None)
    assert table["throughput, one process each, events/s"] == (90.0, 200.0, 120.0, 0.75, 200.0 / 120.0)
    assert table["CPU s per million events, one process each"] == (60.0, 25.0, 40.0, 1.5, 0.625)
    assert table["peak RSS per worker, one process each, MiB"] == (
        700.0,
        650.0,
        95.0,
        700.0 / 95.0,
        650.0 / 95.0,
    )
    assert table["throughput, 2 processes each, events/s"] == (150.0, 300.0, None, None, None)
    assert table["CPU s per million events, 2 processes each"] == (80.0, 32.0, None, None, None)
    assert len(lines) == 11  # 5 at the steady rate, 3 per process count
    text = "\n".join(format_versus({"versus": lines}))
    assert re.search(r"\n +lstmd +lstmd-librdkafka +Quix peer +lstmd / Quix +lstmd-librdkafka / Quix\n", text)
    assert re.search(r"\nthroughput, one process each, events/s +90\.0 +200 +120 +0\.75 +1\.67\n", text)
    assert re.search(r"\nlatency at a steady rate, max ms \(one process each\)( +-){5}\n", text)
    assert (
        "lstmd: LSTMD_KAFKA_CLIENT=kafka-python; lstmd-librdkafka: LSTMD_KAFKA_CLIENT=confluent-kafka" in text
    )
    # One backend asked: its column and ratio only, the peer's kept.
    only = versus_table([r for r in rows if r["requested"] != "lstmd"])
    assert list(only[0]) == ["figure", "lstmd-librdkafka", "quix", "lstmd-librdkafka_vs_quix"]
    assert only[0]["lstmd-librdkafka_vs_quix"] == 0.8


def test_the_versus_contenders_per_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An lstmd contender per Kafka client backend: each runs `lstmd run` with its
    LSTMD_KAFKA_CLIENT whatever the bench's environment has, only those of
    versus_clients run, and a backend not installed is skipped, saying why."""
    assert versus_contenders(bench.BenchConfig()) == ("lstmd", "lstmd-librdkafka", "quix")
    librdkafka = bench.BenchConfig(versus_clients=("confluent-kafka",))
    assert versus_contenders(librdkafka) == ("lstmd-librdkafka", "quix")
    assert versus_contenders(librdkafka, ("lstmd", "quix")) == ("quix",)
    assert versus_contenders(bench.BenchConfig(versus_clients=()), ("lstmd", "lstmd-librdkafka")) == ()
    s = settings(tmp_path, dlq_topic="out.dlq")
    monkeypatch.setenv("LSTMD_KAFKA_CLIENT", "confluent-kafka")
    env = lstmd_env(s, 2, "lstmd")
    assert (env["LSTMD_KAFKA_CLIENT"], env["LSTMD_WORKERS"], env["LSTMD_ENGINE"]) == (
        "kafka-python",
        "2",
        "fast",
    )
    assert lstmd_env(s, 1, "lstmd-librdkafka")["LSTMD_KAFKA_CLIENT"] == "confluent-kafka"
    assert client_missing("kafka-python") == client_missing("confluent-kafka") == ""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "confluent_kafka" else find_spec(name),
    )
    said = "skipped: confluent-kafka is not installed (pip install 'lstmd[librdkafka]')"
    assert client_missing("confluent-kafka") == said
    config = bench.BenchConfig(sections=("latency",), latency_contenders=("lstmd-librdkafka",))
    contenders = Contenders(config, print)
    outcome = contenders.run("lstmd-librdkafka", 1, "127.0.0.1:1", "in", 10, 1.0, output="out")
    assert (outcome.error, outcome.events_per_s) == (said, None)


def test_the_profile_classifies_a_frame_between_lines() -> None:
    """A sampled frame's f_lineno can be None (it killed the sampler thread mid-round):
    a rule that reads the source line then does not match, and the caller names it."""
    code = types.SimpleNamespace(co_filename="/x/daemon/streaming/loop.py", co_name="run")
    frame = types.SimpleNamespace(f_code=code, f_lineno=None, f_back=None)
    assert classify(frame) == "run loop other"
