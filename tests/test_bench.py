"""`lstmd bench`: a tiny smoke run; the structure of the report, never its speeds."""

from __future__ import annotations

import json

import pytest

from daemon import bench
from daemon.cli import main

TINY = bench.BenchConfig(models=("demo",), sequences=(1, 3), rounds=2, events=6, keras_events=2,
                         min_round_s=0.0)


def test_report_structure() -> None:
    messages: list[str] = []
    report = bench.run(TINY, log=messages.append)
    rows = report["rows"]
    assert [(r["engine"], r["sequences"]) for r in rows] == [
        ("keras", 1), ("keras", 3), ("fast", 1), ("fast", 3)]
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
    code = main(["bench", "--json", "--models", "demo", "--engines", "fast", "--sequences", "2",
                 "--rounds", "1", "--events", "4", "--min-round-seconds", "0"])
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
        {"section": "e2e", "model": "m", "sequences": 4, "engine": "keras", "requested": "keras",
         "events_per_s": 100.0},
        {"section": "e2e", "model": "m", "sequences": 4, "engine": "passthrough",
         "requested": "passthrough", "events_per_s": 1000.0},
        {"section": "e2e", "model": "m", "sequences": 8, "engine": "fast", "requested": "fast",
         "events_per_s": 50.0},
    ]
    bench.add_ratios(rows)
    assert [r["vs_keras"] for r in rows] == [1.0, 10.0, None]
