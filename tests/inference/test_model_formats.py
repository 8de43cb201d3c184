"""Model file formats: real Keras 2 HDF5 files (written by tf_keras, tests/support/keras2_models.py)
served by both engines and checked against the Keras 2 model itself; the Keras 2
config translation; the formats that are refused, with exit 2 and how to convert."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from daemon.core.processor import Processor
from daemon.core.state import StateStore
from daemon.devtools.localkafka import LocalKafka
from daemon.errors import UnservableModelError
from daemon.inference import formats
from daemon.inference.engines.factory import make_engine
from daemon.inference.model import ServableModel, load_model
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord
from tests.conftest import TopicFactory
from tests.oracle import assert_matches
from tests.support import keras2_models
from tests.support.streams import (
    DaemonProcess,
    check_predictions,
    consume,
    daemon_env,
    interleaved_stream,
    produce,
)

SERVABLE = sorted(keras2_models.SERVABLE)


def lstmd(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, timeout=180, env=env)


class Interleaved:
    """Five sequences interleaved over 70 events, some closed by `end`, some
    restarted by `start`: the records, and for each event its (key, segment, step)."""

    def __init__(self, features: int, seed: int = 3) -> None:
        rnd = random.Random(seed)
        rng = np.random.default_rng(seed)
        self.records: list[FileRecord] = []
        self.where: list[tuple[str, int, int]] = []
        self.segments: dict[tuple[str, int], list[np.ndarray]] = {}
        segment = {f"s{i}": 0 for i in range(5)}
        for offset in range(70):
            key = rnd.choice(sorted(segment))
            value: dict[str, Any] = {}
            if self.segments.get((key, segment[key])) and rnd.random() < 0.1:
                segment[key] += 1
                value["start"] = True
            x = rng.standard_normal(features).astype(np.float32)
            value["x"] = [float(v) for v in x]
            seg = self.segments.setdefault((key, segment[key]), [])
            self.where.append((key, segment[key], len(seg)))
            seg.append(x)
            if rnd.random() < 0.1:
                value["end"] = True
                segment[key] += 1
            self.records.append(FileRecord("in", 0, offset, 0, key.encode(), orjson.dumps(value)))

    def sequences(self) -> list[np.ndarray]:
        """The segments' inputs, in the order `expected` takes their oracle rows."""
        return [np.stack(self.segments[k]) for k in sorted(self.segments)]

    def expected(self, rows: list[np.ndarray]) -> np.ndarray:
        """Each event's y, from the Keras 2 model's rows for each of `sequences()`."""
        by_segment = dict(zip(sorted(self.segments), rows, strict=True))
        return np.stack([by_segment[(key, seg)][t] for key, seg, t in self.where])


@pytest.fixture(scope="module")
def served() -> dict[str, tuple[ServableModel, Interleaved, np.ndarray]]:
    """Each servable Keras 2 file loaded by lstmd, a stream for it, and the Keras 2
    oracle's outputs (the three files' in one tf_keras subprocess)."""
    paths = [keras2_models.fixture(name) for name in SERVABLE]
    models = [load_model(path) for path in paths]
    streams = [Interleaved(model.n_features) for model in models]
    rows = keras2_models.expected_outputs_of(
        [(path, stream.sequences()) for path, stream in zip(paths, streams, strict=True)]
    )
    return {
        name: (model, stream, stream.expected(answer))
        for name, model, stream, answer in zip(SERVABLE, models, streams, rows, strict=True)
    }


@pytest.mark.parametrize("engine_name", ["keras", "fast"])
@pytest.mark.parametrize("name", SERVABLE)
def test_keras2_file_served_by_each_engine_matches_the_keras2_model(
    served: dict[str, tuple[ServableModel, Interleaved, np.ndarray]], name: str, engine_name: str
) -> None:
    model, stream, expected = served[name]
    assert model.file_format == formats.HDF5
    assert (model.n_features, model.output_width) == keras2_models.SERVABLE[name]
    engine, refused = make_engine(engine_name, model)
    assert engine.name == engine_name and refused is None
    proc = Processor(
        engine,
        model_id=str(model.identity),
        n_features=model.n_features,
        store=StateStore(),
        metrics=Metrics(),
    )
    records = stream.records
    outputs = [o for batch in (records[:20], records[20:45], records[45:]) for o in proc.process(batch)]
    assert not any(o.dead_letter for o in outputs)
    values = [orjson.loads(o.value or b"") for o in outputs]
    assert [(v["seq"], v["n"]) for v in values] == [(k, t + 1) for k, _, t in stream.where]
    assert_matches(np.array([v["y"] for v in values]), expected)


def test_the_stateful_recipe_is_served_stateless_and_batch_1() -> None:
    model = load_model(keras2_models.fixture("stateful_recipe.h5"))
    assert tuple(model.stateless.inputs[0].shape) == (None, None, 1)
    assert tuple(model.stateful.inputs[0].shape) == (1, 1, 1)
    assert model.layer_kinds == ["LSTM", "Dense"] and model.state_shapes == [(10,), (10,)]
    assert "lstm: dropped time_major=False" in model.translations


@pytest.mark.parametrize("name", ["m.hdf5", "M.H5"])
def test_every_hdf5_suffix_in_any_case(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(keras2_models.fixture("stacked_stateless.h5").read_bytes())
    model = load_model(path)
    assert model.file_format == formats.HDF5 and model.identity.name == path.stem


# ------------------------------------------------------------------ the translation


def _lstm(**extra: Any) -> dict[str, Any]:
    return {"class_name": "LSTM", "config": {"name": "lstm", "units": 2, "time_major": False, **extra}}


def test_the_old_sequential_layout_gets_an_input_layer() -> None:
    config = {
        "class_name": "Sequential",
        "config": {
            "name": "seq",
            "layers": [
                _lstm(batch_input_shape=[1, 1, 3], stateful=True, dtype="float32"),
                {"class_name": "Dense", "config": {"name": "dense", "units": 1, "batch_input_shape": [1, 2]}},
            ],
        },
    }
    new, changes = formats.translate_keras2_config(config)
    layers: list[dict[str, Any]] = new["config"]["layers"]
    assert [entry["class_name"] for entry in layers] == ["InputLayer", "LSTM", "Dense"]
    assert layers[0]["config"] == {"batch_shape": [1, 1, 3], "dtype": "float32", "name": "lstm_input"}
    assert all("batch_input_shape" not in e["config"] and "time_major" not in e["config"] for e in layers[1:])
    assert changes == [
        "lstm: batch_input_shape [1, 1, 3] became an InputLayer",
        "dense: dropped batch_input_shape",
        "lstm: dropped time_major=False",
    ]
    assert "time_major" in str(config)  # the input is left alone


def test_nested_layers_are_translated_and_time_major_true_is_refused() -> None:
    bidi = {"class_name": "Bidirectional", "config": {"name": "bi", "layer": _lstm(), "merge_mode": "concat"}}
    new, changes = formats.translate_keras2_config(bidi)
    assert "time_major" not in new["config"]["layer"]["config"] and changes == [
        "lstm: dropped time_major=False"
    ]
    with pytest.raises(UnservableModelError, match=r"'lstm' was saved with time_major=True"):
        formats.translate_keras2_config(_lstm(time_major=True))


def test_a_keras3_config_is_left_as_it_is() -> None:
    model = load_model(keras2_models.fixture("stacked_stateless.h5"))
    config = {"class_name": "Functional", "config": model.stateless.get_config()}
    assert formats.translate_keras2_config(config) == (config, [])


# ------------------------------------------------------------------ refused


Refusal = subprocess.CompletedProcess[bytes]

REFUSED = [
    ("bidirectional.h5", ["layer 'bidirectional' is Bidirectional", "future of the sequence"]),
    (
        "saved_model_dir",
        ["TensorFlow SavedModel directory", 'model.save("m.h5")', 'model.save("m.keras")'],
    ),
    ("notes.txt", [".txt is not a model format lstmd reads", 'model.save("m.keras")']),
]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Refusal]]:
    """`lstmd replay` of each refused file (REFUSED), two processes at a time: the path and the process."""
    tmp = tmp_path_factory.mktemp("refused")
    (tmp / "notes.txt").write_text("not a model\n")
    events = tmp / "events.jsonl"
    events.write_bytes(b'{"key": "a", "value": {"x": [1.0, 2.0]}}\n')
    paths = {name: keras2_models.fixture(name) if name != "notes.txt" else tmp / name for name, _ in REFUSED}
    with ThreadPoolExecutor(2) as pool:
        procs = pool.map(
            lambda path: lstmd("replay", "--model", str(path), "--input", str(events)), paths.values()
        )
        return {name: (paths[name], proc) for name, proc in zip(paths, procs, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "says"), REFUSED)
def test_unservable_files_exit_2_saying_why(
    refusals: dict[str, tuple[Path, Refusal]], name: str, says: list[str]
) -> None:
    path, proc = refusals[name]
    err = proc.stderr.decode()
    assert proc.returncode == 2, err[-2000:]
    assert str(path) in err
    for phrase in says:
        assert phrase in err


def test_weights_only_and_misnamed_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnservableModelError, match=r"weights only \(model.save_weights\)"):
        load_model(keras2_models.fixture("weights_only.h5"))
    misnamed = tmp_path / "m.keras"
    misnamed.write_bytes(keras2_models.fixture("stacked_stateless.h5").read_bytes())
    with pytest.raises(UnservableModelError, match="its content is an HDF5 file"):
        load_model(misnamed)


def test_the_configuration_accepts_every_format_lstmd_reads() -> None:
    from daemon.config import MODEL_SUFFIXES

    assert set(MODEL_SUFFIXES) == set(formats.SUFFIXES)


# ------------------------------------------------------------------ through the broker


@pytest.mark.kafka
def test_the_stateful_recipe_h5_through_the_broker(kafka: LocalKafka, topics: TopicFactory) -> None:
    """`lstmd run` serving the classic stateful recipe's .h5: every prediction is the
    Keras 2 model's own output for its prefix."""
    model = keras2_models.fixture("stateful_recipe.h5")
    names = topics({"in": 2, "out": 1, "dlq": 1})
    stream = interleaved_stream(n_keys=8, n_events=200, features=1, seed=21)
    placed = produce(kafka.bootstrap, names["in"], stream.events)
    daemon = DaemonProcess(daemon_env(kafka.bootstrap, names, model, LSTMD_ENGINE="fast"))
    try:
        loaded = daemon.wait_for("model_loaded")
        outputs = consume(
            kafka.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            settle=1.0,
            while_running=daemon,
        )
    finally:
        assert daemon.stop() == 0, "\n".join(daemon.lines[-30:])
    assert loaded["engine"] == "fast" and loaded["model"].startswith("stateful_recipe@")
    check_predictions(model, stream, placed, outputs, oracle=keras2_models.expected_outputs)
