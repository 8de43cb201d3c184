"""The `peer` section (not in the default run; `--peer`): the same job as a Quix
Streams application.

The application (daemon/devtools/quix_peer.py; confluent-kafka underneath): a
per-key NumPy LSTM step of the same weights, the state (h, c, n) in Quix's state
store (RocksDB plus its changelog topic), reading the same input topic, writing
one prediction per event to its own output topic, on the same broker. It runs
as a subprocess of an interpreter that has quixstreams: this venv's if it has
it, else a venv made once in ~/.cache/lstmd (not this one: quixstreams pins
pydantic below the daemon's). Measured from the broker's append times (see
e2e.py), stopped by SIGTERM once all outputs are in. Skipped, with the reason,
when quixstreams cannot be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from daemon.devtools.bench.broker import (
    BROKER,
    OUTPUT_TOPIC_CONFIG,
    Launch,
    broker_rate,
    create_topics_for_bench,
    run_all_until_outputs,
    unique,
)
from daemon.devtools.bench.config import E2E_MODEL, MODELS, BenchConfig, Log, Row
from daemon.devtools.bench.e2e import ENGINE_CACHE, Round, e2e_row
from daemon.devtools.bench.files import model_file, work_dir

PEER_REQUIREMENT = "quixstreams>=3.20,<4"
PEER_VENV = "bench-peer-venv"


# The Quix Streams application (daemon/devtools/quix_peer.py), run by path by an
# interpreter that has quixstreams but maybe not lstmd. Argument: a JSON object
# (bootstrap, input, output, group, state_dir, weights, model).
PEER_SCRIPT = Path(__file__).parents[1] / "quix_peer.py"


def has_quix(python: str) -> bool:
    try:
        return (
            subprocess.run([python, "-c", "import quixstreams"], capture_output=True, timeout=120).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def peer_python(config: BenchConfig, log: Log) -> str:
    """An interpreter with quixstreams: the configured one, this one, or a venv made
    (once) in lstmd's cache with `pip install quixstreams`. RuntimeError says why not."""
    if config.peer_python:
        if not has_quix(config.peer_python):
            raise RuntimeError(f"{config.peer_python} cannot import quixstreams")
        return config.peer_python
    if has_quix(sys.executable):
        return sys.executable
    from daemon.devtools.localkafka import cache_dir

    venv = cache_dir().parent / PEER_VENV
    python = venv / "bin" / "python"
    if python.exists() and has_quix(str(python)):
        return str(python)
    log(
        f"bench: quixstreams is missing: installing {PEER_REQUIREMENT} and numpy into {venv} "
        "(once; a venv of its own because quixstreams pins pydantic below lstmd's) ..."
    )
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300
        )
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", PEER_REQUIREMENT, "numpy"],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"pip install {PEER_REQUIREMENT} failed: {' '.join(tail)}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"pip install {PEER_REQUIREMENT} failed: {exc}") from None
    if not has_quix(str(python)):
        raise RuntimeError(f"quixstreams installed in {venv} but cannot be imported")
    return str(python)


def peer_weights(path: Path, model_name: str = E2E_MODEL) -> Path:
    """A bench model's weights (an LSTM and its Dense(1, sigmoid) head) as NumPy
    arrays for the peer's step (keras extracts them)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.models.load_model(model_file(MODELS[model_name]), compile=False)
    lstm = next(layer for layer in model.layers if isinstance(layer, keras.layers.LSTM))
    dense = next(layer for layer in model.layers if isinstance(layer, keras.layers.Dense))
    kernel, recurrent, bias = (np.asarray(w, dtype=np.float32) for w in lstm.get_weights())
    dense_kernel, dense_bias = (np.asarray(w, dtype=np.float32) for w in dense.get_weights())
    np.savez(
        path, kernel=kernel, recurrent=recurrent, bias=bias, dense_kernel=dense_kernel, dense_bias=dense_bias
    )
    return path


def read_predictions(
    bootstrap: str, topic: str, partitions: int, limit: int, timeout_s: float = 60.0
) -> dict[tuple[int, int], list[float]]:
    """Up to `limit` predictions of an output topic: (input partition, offset) -> y."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = consumer.end_offsets(tps)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        wanted = min(limit, sum(ends.values()))
        out: dict[tuple[int, int], list[float]] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < wanted and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for rec in records:
                    value = orjson.loads(rec.value)
                    if "y" in value:
                        out[(value["partition"], value["offset"])] = value["y"]
        return out
    finally:
        consumer.close()


def compare_predictions(
    bootstrap: str, ours: str, theirs: str, partitions: int, limit: int = 5000
) -> tuple[int, float | None]:
    """(how many, max |y difference|) over the predictions of the same inputs in
    both topics (at most `limit` read from each): the peer does the same job."""
    a = read_predictions(bootstrap, ours, partitions, limit)
    b = read_predictions(bootstrap, theirs, partitions, limit)
    common = a.keys() & b.keys()
    if not common:
        return 0, None
    return len(common), max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in common)


class PeerProcesses:
    """The launches of N peer processes in one consumer group (each with a state
    directory of its own: RocksDB locks it), and their directories removed after."""

    def __init__(
        self,
        python: str,
        script: Path,
        weights: Path,
        model_id: str,
        bootstrap: str,
        input_topic: str,
        output: str,
    ) -> None:
        self.python, self.script = python, script
        self.args = {
            "bootstrap": bootstrap,
            "input": input_topic,
            "output": output,
            "group": unique("bench-quix"),
            "weights": str(weights),
            "model": model_id,
        }
        self.dirs: list[Path] = []

    def launches(self, processes: int) -> list[Launch]:
        out = []
        for _ in range(processes):
            state_dir = Path(tempfile.mkdtemp(prefix="quix-state-", dir=work_dir()))
            self.dirs.append(state_dir)
            args = self.args | {"state_dir": str(state_dir)}
            out.append(Launch([self.python, str(self.script), json.dumps(args)], state_dir / "peer.log"))
        return out

    def __enter__(self) -> PeerProcesses:
        return self

    def __exit__(self, *_: object) -> None:
        for state_dir in self.dirs:
            shutil.rmtree(state_dir, ignore_errors=True)


class PeerSection:
    """The same job as a Quix Streams application (see the module docstring)."""

    name = "peer"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        try:
            python = peer_python(config, log)
        except RuntimeError as exc:
            log(f"bench: peer skipped: {exc}")
            return [self._row(config, [], f"skipped: {exc}")]
        bootstrap, input_topic = BROKER.input_topic(config, log)
        weights = peer_weights(work_dir() / "peer-weights.npz")
        model_id = str(ENGINE_CACHE.get("fast")[0].identity)
        rounds = []
        for i in range(config.e2e_rounds):
            log(f"bench: peer round {i + 1}/{config.e2e_rounds} quix ({config.e2e_events:,} events) ...")
            rounds.append(self.one(python, PEER_SCRIPT, weights, model_id, bootstrap, input_topic, config))
        row = self._row(config, rounds, "")
        done = next((r for r in rounds if not r.error), None)
        if done is not None and BROKER.fast_outputs:
            log("bench: peer: comparing its predictions with lstmd fast's ...")
            row["parity_compared"], row["parity_max_abs_dy"] = compare_predictions(
                bootstrap, BROKER.fast_outputs, done.topic, config.e2e_partitions
            )
        return [row]

    def _row(self, config: BenchConfig, rounds: list[Round], note: str) -> Row:
        row = e2e_row(self.name, "quix", "quix", config.e2e_sequences, rounds, note)
        row["latency_p50_ms"] = row["latency_p99_ms"] = None
        return row

    @staticmethod
    def one(
        python: str,
        script: Path,
        weights: Path,
        model_id: str,
        bootstrap: str,
        input_topic: str,
        config: BenchConfig,
    ) -> Round:
        output = unique("bench-out-quix")
        create_topics_for_bench(bootstrap, {output: config.e2e_partitions}, OUTPUT_TOPIC_CONFIG)
        with PeerProcesses(python, script, weights, model_id, bootstrap, input_topic, output) as peer:
            run = run_all_until_outputs(
                peer.launches(1),
                (bootstrap, output, config.e2e_partitions),
                config.e2e_events,
                config.e2e_timeout_s,
            )
        round_ = Round([], error=f"the peer {run.error}" if run.error else "")
        round_.cpu_us_per_event = run.cpu_us_per_event
        round_.topic = output
        if not round_.error:
            round_.outputs, round_.broker_events_per_s = broker_rate(bootstrap, output, config.e2e_partitions)
        return round_
