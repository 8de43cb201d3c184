"""What a restore installs: states of this model, never another model's."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.state import SequenceState, StateStore
from daemon.ops.health import Health
from daemon.ops.metrics import Metrics
from daemon.streaming.loop import RunLoop
from tests.test_processor import SumEngine, outputs, recs


def settings(tmp_path: Path, **extra: Any) -> Settings:
    """Valid settings for unit tests (no connection is made)."""
    model = tmp_path / "m.keras"
    model.write_bytes(b"x")
    return Settings(kafka_bootstrap_servers="127.0.0.1:1", input_topic="in", output_topic="out",
                    group_id="g", model_path=model, **extra)


def loop(tmp_path: Path, max_sequences: int = 0) -> RunLoop:
    metrics = Metrics()
    proc = Processor(SumEngine(), model_id="new@1", n_features=1,
                     store=StateStore(max_sequences), metrics=metrics)
    return RunLoop(settings(tmp_path), proc, metrics, Health(60), threading.Event())


def test_a_state_of_another_model_is_dropped_announced_and_keeps_its_watermark(tmp_path: Path) -> None:
    rl = loop(tmp_path)
    mine = SequenceState(tensors=[np.array([2.0], np.float32)], n=2, watermark=7)
    theirs = SequenceState(tensors=[np.array([9.0], np.float32)], n=4, watermark=8)
    evicted = rl._install(0, {"a": (mine, "new@1"), "b": (theirs, "old@0")})
    assert [(e.key, e.cause, e.n, e.watermark) for e in evicted] == [("b", "model_changed", 4, 8)]
    notice = orjson.loads(rl.processor.announce(evicted)[0].value or b"")
    assert notice["evicted"] is True and notice["cause"] == "model_changed"
    # "a" continues from its restored state; "b" starts over above its watermark.
    got = outputs(rl.processor, recs([("b", {"x": [8]}), ("a", {"x": [1]}), ("b", {"x": [1]})],
                                     start=8))  # b@8 is at its watermark: already answered
    assert [(o["seq"], o["y"], o["n"]) for o in got] == [("a", [3.0], 3), ("b", [1.0], 1)]


def test_capacity_eviction_is_announced_in_the_batch(tmp_path: Path) -> None:
    rl = loop(tmp_path, max_sequences=2)
    out = rl.processor.process(recs([("a", {"x": [1]}), ("b", {"x": [1]}), ("c", {"x": [1]})]))
    notices = [orjson.loads(o.value or b"") for o in out if o.announcement]
    assert [(n["seq"], n["cause"]) for n in notices] == [("a", "capacity")]
    assert len(rl.store) == 2
