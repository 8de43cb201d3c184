"""The `memory` section: resident bytes per open sequence in a `StateStore`.

For each count of `BenchConfig.memory_counts`, a fresh Python process (so that
no allocator history of another size counts; `python -m
daemon.devtools.bench.memory HOW MODEL COUNT`) reads its resident set size
(VmRSS, /proc/self/status) once set up, fills a `StateStore` with COUNT open
sequences of the demo model's shape, collects garbage, reads VmRSS again and
prints the difference over COUNT. HOW is how the states got there:

* `restored`: as a restore leaves them: `SequenceState.from_snapshot` of a snapshot
  record (random tensors), `StateStore.install` (no TensorFlow in the process);
* `processed`: as serving leaves them: one input per sequence through
  `Processor.process` with the fast engine, in batches of `scale_batch`, each
  followed by the checkpoint's `take_changes` (the model and the engine are
  loaded and warmed up before the first reading).

A row per path and count: bytes per sequence, the state tensors' own bytes per
sequence (`StateStore.state_bytes`), their ratio, the snapshot record's size.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from daemon.devtools.bench.config import MODELS, BenchConfig, Log, Row

MEMORY_MODEL = "demo"
PATHS = ("restored", "processed")


def rss_bytes() -> int:
    """This process's resident set size (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def _fill_restored(count: int, model_name: str, seed: int) -> tuple[Any, int, int]:
    from daemon.core.state import SequenceState, StateStore

    spec = MODELS[model_name]
    shapes = [(spec.units,), (spec.units,)]  # an LSTM's h and c
    model_id = f"{spec.name}@{'0' * 16}"
    rng = np.random.default_rng(seed)
    store = StateStore(0)
    record_bytes = 0
    before = 0
    chunk = 10_000
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        block = rng.standard_normal((n, len(shapes), spec.units), dtype=np.float32)
        records = [
            SequenceState(tensors=list(block[i]), n=10, watermark=start + i, first_offset=start + i).snapshot(
                model_id
            )
            for i in range(n)
        ]
        record_bytes = len(records[0])
        if start == 0:
            del block
            gc.collect()
            before = rss_bytes()  # set up, one chunk of records in hand
        for i, raw in enumerate(records):
            state, _ = SequenceState.from_snapshot(raw)
            store.install(0, f"s{start + i:07d}", state)
        del records
    return store, before, record_bytes


def _fill_processed(count: int, model_name: str, batch: int) -> tuple[Any, int, int]:
    from daemon.core.processor import Processor
    from daemon.core.state import StateStore
    from daemon.devtools.bench.files import model_file
    from daemon.inference.engines.factory import make_engine
    from daemon.inference.model import load_model
    from daemon.ops.metrics import Metrics
    from daemon.replay import FileRecord

    model = load_model(model_file(MODELS[model_name]))
    engine, refused = make_engine("fast", model)
    if refused:
        raise RuntimeError(f"fast engine refused: {refused}")
    model_id = str(model.identity)
    store = StateStore(0)
    processor = Processor(
        engine, model_id=model_id, n_features=model.n_features, store=store, metrics=Metrics()
    )
    value = json.dumps({"x": [0.5] * model.n_features}).encode()
    warm = [FileRecord("in", 1, i, 0, f"w{i}".encode(), value) for i in range(batch)]
    processor.process(warm)
    record_bytes = len(store.take_changes(model_id)[0][2] or b"")
    store.drop_partition(1)
    gc.collect()
    before = rss_bytes()
    for start in range(0, count, batch):
        records = [
            FileRecord("in", 0, i, 0, f"s{i:07d}".encode(), value)
            for i in range(start, min(count, start + batch))
        ]
        processor.process(records)
        store.take_changes(model_id)
    return store, before, record_bytes


def measure_here(how: str, model_name: str, count: int, batch: int = 500, seed: int = 0) -> dict[str, Any]:
    """Fill a store in this process; what `child` prints."""
    if how == "restored":
        store, before, record_bytes = _fill_restored(count, model_name, seed)
    elif how == "processed":
        store, before, record_bytes = _fill_processed(count, model_name, batch)
    else:
        raise ValueError(f"unknown path {how!r}; expected one of {', '.join(PATHS)}")
    gc.collect()
    after = rss_bytes()
    if len(store) != count:
        raise RuntimeError(f"{len(store)} states in the store, expected {count}")
    return {
        "count": count,
        "rss_before": before,
        "rss_after": after,
        "tensor_bytes": store.state_bytes(),
        "record_bytes": record_bytes,
    }


def measure_in_child(how: str, model_name: str, count: int, batch: int, seed: int) -> dict[str, Any]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", __name__, how, model_name, str(count), str(batch), str(seed)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def memory_row(how: str, model_name: str, m: dict[str, Any]) -> Row:
    count = int(m["count"])
    per = (m["rss_after"] - m["rss_before"]) / count
    tensors = m["tensor_bytes"] / count
    return {
        "section": MemorySection.name,
        "model": model_name,
        "engine": how,
        "requested": how,
        "open_sequences": count,
        "bytes_per_sequence": per,
        "rss_delta_bytes": m["rss_after"] - m["rss_before"],
        "tensor_bytes_per_sequence": tensors,
        "vs_tensor_bytes": per / tensors if tensors else None,
        "record_bytes": m["record_bytes"],
        "note": "",
    }


class MemorySection:
    """Resident bytes per open sequence (see the module docstring)."""

    name = "memory"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        rows: list[Row] = []
        for how in PATHS:
            for count in config.memory_counts:
                log(f"bench: memory {MEMORY_MODEL} {how} x{count:,} (a fresh process) ...")
                m = measure_in_child(how, MEMORY_MODEL, count, config.scale_batch, config.seed)
                rows.append(memory_row(how, MEMORY_MODEL, m))
        return rows


def child(argv: list[str]) -> int:
    how, model_name, count, batch, seed = argv
    print(json.dumps(measure_here(how, model_name, int(count), int(batch), int(seed))))
    return 0


if __name__ == "__main__":
    raise SystemExit(child(sys.argv[1:]))
