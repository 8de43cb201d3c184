"""The command line as a user runs it: replay against the oracle, refusals exit 2;
the development commands registered by entry point, and absent without devtools."""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from daemon import cli
from tests.oracle import assert_matches, expected_outputs_many
from tests.support.models import built


def lstmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, timeout=180, env=env)


@pytest.mark.slow
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
    proc = lstmd(
        "replay",
        "--model",
        str(model),
        "--input",
        str(source),
        "--output",
        str(out),
        "--dlq",
        str(dlq),
        "--engine",
        engine,
    )
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


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_refuses_an_unservable_model_with_exit_2(tmp_path: Path, workers: str) -> None:
    """With several workers (each loads the model) the pod says it once, last, as one process does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")} | {
        "LSTMD_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "LSTMD_INPUT_TOPIC": "in",
        "LSTMD_OUTPUT_TOPIC": "out",
        "LSTMD_GROUP_ID": "g",
        "LSTMD_HTTP_PORT": "0",
        "LSTMD_WORKERS": workers,
        "LSTMD_MODEL_PATH": str(built("bidirectional")),
    }
    proc = lstmd("run", env=env)
    assert proc.returncode == 2, proc.stderr.decode()[-2000:]
    err = proc.stderr.decode()
    assert "Bidirectional" in err and "bidirectional.keras" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lstmd: ") and "Bidirectional" in last
    assert err.count("lstmd: ") == 1


def commands(parser: argparse.ArgumentParser) -> set[str]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_devtools_commands_come_from_their_entry_point() -> None:
    (entry_point,) = (ep for ep in entry_points(group=cli.COMMANDS_GROUP) if ep.name == "devtools")
    assert entry_point.value == "daemon.devtools.commands:register"
    assert commands(cli.parser()) == {"run", "replay", "inspect", "bench", "make-demo-model", "demo"}
    args = cli.parser().parse_args(["demo", "--events", "5"])
    assert (args.events, args.sequences, args.func.__module__) == (5, 8, "daemon.devtools.commands")


def without_devtools(missing: str) -> list[EntryPoint]:
    """The devtools entry point, its load failing as it does when `missing` cannot be imported."""

    class Missing(EntryPoint):
        def load(self) -> Any:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    return [Missing("devtools", "daemon.devtools.commands:register", cli.COMMANDS_GROUP)]


@pytest.mark.parametrize("missing", ["daemon.devtools.commands", "daemon.devtools"])
def test_without_devtools_only_run_replay_and_inspect(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    """The image: the entry point is in the package metadata, its module is not."""
    monkeypatch.setattr(cli, "entry_points", lambda group: without_devtools(missing))
    parser = cli.parser()
    assert commands(parser) == {"run", "replay", "inspect"}
    args = parser.parse_args(["replay", "--model", "m.keras", "--input", "in.jsonl"])
    assert args.func is cli.cmd_replay and args.engine is None  # LSTMD_ENGINE decides
    assert parser.parse_args(["run"]).func is cli.cmd_run
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench"])
    assert exc.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err


def test_a_command_module_missing_a_dependency_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the entry point's own module being absent is skipped, not a broken import inside it."""
    monkeypatch.setattr(cli, "entry_points", lambda group: without_devtools("quixstreams"))
    with pytest.raises(ModuleNotFoundError, match="quixstreams"):
        cli.parser()


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement may import (`from a import b`: a, and a.b if a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)] if node.module else []


def test_the_runtime_never_imports_devtools() -> None:
    """Not even lazily: the image leaves daemon/devtools/ out."""
    daemon = Path(cli.__file__).parent
    offenders = [
        f"{path.relative_to(daemon.parent)}:{node.lineno}"
        for path in sorted(daemon.rglob("*.py"))
        if daemon / "devtools" not in path.parents
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(name == "daemon.devtools" or name.startswith("daemon.devtools.") for name in imported(node))
    ]
    assert offenders == []
