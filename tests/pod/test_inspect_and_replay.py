"""`lstmd inspect` and the configuration every command shares: replay and inspect read
the daemon's LSTMD_* pipeline variables (engine, step gap, record and sequence
limits) without the Kafka ones, each flag overriding its variable."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest

from daemon.cli import main
from daemon.config import load_pipeline_settings
from daemon.errors import ConfigError
from tests.oracle import assert_matches
from tests.support import keras2_models
from tests.support.models import built


def lstmd(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args], capture_output=True, timeout=180, env=base | env
    )


@pytest.fixture
def no_lstmd_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("LSTMD_"):
            monkeypatch.delenv(name)
    return monkeypatch


# ------------------------------------------------------------------ inspect


@pytest.mark.slow
def test_inspect_json_describes_a_keras2_model() -> None:
    proc = lstmd("inspect", "--json", str(keras2_models.fixture("stateful_recipe.h5")))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    report = orjson.loads(proc.stdout)
    assert report["model"].startswith("stateful_recipe@") and len(report["sha256"]) == 64
    assert report["format"] == "Keras 2 HDF5 (.h5)"
    assert "lstm: dropped time_major=False" in report["translated"]
    assert report["layers"] == ["LSTM", "Dense"]
    assert (report["input_features"], report["output_width"]) == (1, 1)
    assert report["engine"] == {
        "configured": "keras",
        "serving": "keras",
        "with_fast": "fast",
        "fast_refused": None,
    }
    assert report["state_shapes"] == [[10], [10]]
    assert report["state_bytes_per_sequence"] == 80  # two float32 states of 10
    assert report["self_check"].startswith("passed")


def test_inspect_text_says_why_fast_refuses(
    no_lstmd_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_lstmd_env.setenv("LSTMD_ENGINE", "fast")
    assert main(["inspect", str(built("unit_norm"))]) == 0
    text = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in text.splitlines())
    assert lines["format"] == "Keras 3 (.keras)"
    assert lines["layers"].startswith("LSTM, UnitNormalization")
    assert lines["engine"].startswith(
        "keras (LSTMD_ENGINE=fast); with LSTMD_ENGINE=fast: keras, fast refused: "
    )
    assert "'unit_normalization' (UnitNormalization)" in lines["engine"]
    assert lines["self-check"].startswith("passed")
    # The flag overrides the variable.
    assert main(["inspect", "--engine", "keras", str(built("unit_norm"))]) == 0
    assert "keras (LSTMD_ENGINE=keras)" in capsys.readouterr().out


@pytest.mark.slow
def test_inspect_refuses_a_model_with_exit_2_and_the_message_run_gives() -> None:
    model = str(keras2_models.fixture("bidirectional.h5"))
    with ThreadPoolExecutor(1) as pool:  # the two processes side by side
        inspecting = pool.submit(lstmd, "inspect", model)
        ran = lstmd(
            "run",
            LSTMD_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
            LSTMD_INPUT_TOPIC="in",
            LSTMD_OUTPUT_TOPIC="out",
            LSTMD_GROUP_ID="g",
            LSTMD_HTTP_PORT="0",
            LSTMD_MODEL_PATH=model,
        )
        inspected = inspecting.result()
    assert (inspected.returncode, ran.returncode) == (2, 2), ran.stderr.decode()[-2000:]
    said = inspected.stderr.decode().strip().splitlines()[-1]
    assert said.startswith(f"lstmd: model file {model!r}: layer 'bidirectional' is Bidirectional")
    assert said == ran.stderr.decode().strip().splitlines()[-1]


# ------------------------------------------------------------------ replay's settings


@pytest.mark.slow
def test_replay_reads_the_pipeline_variables_and_its_flags_override_them(tmp_path: Path) -> None:
    model = keras2_models.fixture("stateful_recipe.h5")
    xs = np.random.default_rng(4).normal(size=(5, 1)).round(4).astype(np.float32)
    steps = [0, 1, 2, 5, 6]  # a gap before the fourth event
    events = tmp_path / "events.jsonl"
    events.write_bytes(
        b"".join(
            orjson.dumps({"key": "a", "value": {"x": [float(x[0])], "step": s}}) + b"\n"
            for x, s in zip(xs, steps, strict=True)
        )
    )

    def replay(out_name: str, *flags: str, **env: str) -> tuple[str, list[dict[str, object]]]:
        out = tmp_path / out_name
        proc = lstmd(
            "replay", "--model", str(model), "--input", str(events), "--output", str(out), *flags, **env
        )
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        return proc.stderr.decode().strip().splitlines()[-1], [
            orjson.loads(v) for v in out.read_bytes().splitlines()
        ]

    env = {"LSTMD_ENGINE": "fast", "LSTMD_STEP_GAP": "reset"}
    with ThreadPoolExecutor(1) as pool:  # the two replays side by side
        flagged = pool.submit(replay, "flagged.jsonl", "--engine", "keras", "--step-gap", "continue", **env)
        summary, preds = replay("out.jsonl", **env)
        assert summary == "lstmd replay: 5 predictions, 0 rejected; engine fast"
        assert [p["n"] for p in preds] == [1, 2, 3, 1, 2]  # the gap reset the sequence
        expected = keras2_models.expected_outputs(model, [xs[:3], xs[3:], xs])
        assert_matches(np.array([p["y"] for p in preds]), np.concatenate(expected[:2]))

        summary, preds = flagged.result()
        assert summary == "lstmd replay: 5 predictions, 0 rejected; engine keras"
        assert [p["n"] for p in preds] == [1, 2, 3, 4, 5]  # the gap continued the sequence
        assert_matches(np.array([p["y"] for p in preds]), expected[2])


def test_pipeline_settings_need_no_kafka_and_name_the_bad_variable_or_flag(
    no_lstmd_env: pytest.MonkeyPatch,
) -> None:
    no_lstmd_env.setenv("LSTMD_ENGINE", "fast")
    no_lstmd_env.setenv("LSTMD_MAX_SEQUENCES", "7")
    settings = load_pipeline_settings(engine=None, max_sequences=None)
    assert (settings.engine, settings.max_sequences, settings.step_gap) == ("fast", 7, "continue")
    assert load_pipeline_settings(engine="keras").engine == "keras"
    no_lstmd_env.setenv("LSTMD_MAX_RECORD_BYTES", "10")
    with pytest.raises(
        ConfigError, match="LSTMD_MAX_RECORD_BYTES: Input should be greater than or equal to 64"
    ):
        load_pipeline_settings()
    with pytest.raises(
        ConfigError, match="--max-sequences: Input should be greater than or equal to 0"
    ) as info:
        load_pipeline_settings(max_record_bytes=4096, max_sequences=-1)
    assert "LSTMD_MAX_RECORD_BYTES" not in str(info.value)
