"""The command line as a user runs it: replay against the oracle, refusals exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from tests.models import built
from tests.oracle import assert_matches, expected_outputs_many


def lstmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True,
                          timeout=180, env=env)


@pytest.mark.parametrize("engine", ["keras", "fast"])
def test_replay_matches_the_oracle(tmp_path: Path, engine: str) -> None:
    model = built("three_kinds")
    rng = np.random.default_rng(9)
    seqs = {"a": rng.normal(size=(6, 2)), "b": rng.normal(size=(4, 2)), "c": rng.normal(size=(5, 2))}
    lines = []
    order = [k for k, v in seqs.items() for _ in range(len(v))]
    rng.shuffle(order)
    pos = dict.fromkeys(seqs, 0)
    for key in order:
        x = seqs[key][pos[key]]
        pos[key] += 1
        lines.append({"key": key, "value": {"x": x.round(5).tolist()}})
    lines.insert(3, {"key": "a", "value": {"x": [1.0]}})  # wrong width: to the DLQ lines
    lines.append({"key": "b", "value": {"end": True}})
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    out, dlq = tmp_path / "out.jsonl", tmp_path / "dlq.jsonl"
    proc = lstmd("replay", "--model", str(model), "--input", str(source), "--output", str(out),
                 "--dlq", str(dlq), "--engine", engine)
    assert proc.returncode == 0, proc.stderr.decode()
    preds = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    dead = [orjson.loads(line) for line in dlq.read_bytes().splitlines()]
    assert [d["headers"]["lstmd.error.class"] for d in dead] == ["wrong_width"]
    assert dead[0]["headers"]["lstmd.source.offset"] == "3"
    xs = {k: np.asarray(v.round(5), np.float32) for k, v in seqs.items()}
    expected = dict(zip(xs, expected_outputs_many(model, list(xs.values())), strict=True))
    for key in seqs:
        mine = [p for p in preds if p["seq"] == key]
        assert [p["n"] for p in mine] == list(range(1, len(seqs[key]) + 1))
        assert_matches(np.asarray([p["y"] for p in mine]), expected[key])
    assert all(p["partition"] == 0 for p in preds)


def test_run_refuses_an_unservable_model_with_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")} | {
        "LSTMD_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "LSTMD_INPUT_TOPIC": "in",
        "LSTMD_OUTPUT_TOPIC": "out", "LSTMD_GROUP_ID": "g", "LSTMD_HTTP_PORT": "0",
        "LSTMD_MODEL_PATH": str(built("bidirectional")),
    }
    proc = lstmd("run", env=env)
    assert proc.returncode == 2, proc.stderr.decode()[-2000:]
    err = proc.stderr.decode()
    assert "Bidirectional" in err and "bidirectional.keras" in err
