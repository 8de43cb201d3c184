"""The layer zoo (issue 10): time-series models with normalizations, rescaling,
TimeDistributed, a last recurrent layer returning sequences, masking and merges,
served by both engines through the processor, every prediction the oracle's
(tests/oracle.py, 1e-5). The fast engine must serve each itself: no fallback."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

from daemon.core.processor import Processor
from daemon.core.state import SequenceState, StateStore
from daemon.errors import UnservableModelError
from daemon.inference.engines.contract import parity_guard
from daemon.inference.engines.factory import make_engine
from daemon.inference.engines.fast import FastEngine
from daemon.inference.engines.fast.conv import CausalConvOp
from daemon.inference.engines.fast.kernels import RecurrentOp
from daemon.inference.engines.keras import KerasEngine
from daemon.inference.model import ServableModel, load_model, mask_value
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord
from tests.oracle import assert_matches, expected_outputs_many
from tests.support.models import ZOO, built, loaded_model

KINDS = sorted(ZOO)


@pytest.fixture(scope="module")
def loaded() -> dict[str, ServableModel]:
    return {}


def _model(loaded: dict[str, ServableModel], kind: str) -> ServableModel:
    if kind not in loaded:
        loaded[kind] = loaded_model(kind)
    return loaded[kind]


def _serve(model: ServableModel, engine_name: str, kind: str, seed: int) -> None:
    """5 interleaved sequences of ~60 events in 3 poll batches, with resets
    (`start`) and, for the masked models, masked steps (runs of them, and a
    sequence starting with one); every output checked against the oracle."""
    engine, reason = make_engine(engine_name, model)
    assert reason is None
    assert isinstance(engine, FastEngine if engine_name == "fast" else KerasEngine)
    proc = Processor(
        engine, model_id="m@0", n_features=model.n_features, store=StateStore(), metrics=Metrics()
    )
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    masked = mask_value(model)
    segments: dict[str, list[list[np.ndarray]]] = {f"s{i}": [[]] for i in range(5)}
    records, where = [], []
    for offset in range(60):
        key = rnd.choice(sorted(segments))
        start = bool(segments[key][-1]) and rnd.random() < 0.1
        if start:
            segments[key].append([])
        x = rng.standard_normal(model.n_features).astype(np.float32)
        if masked is not None and (rnd.random() < 0.3 or offset == 0):
            x[:] = masked
        seg = segments[key][-1]
        seg.append(x)
        where.append((key, len(segments[key]) - 1, len(seg) - 1))
        value = {"x": [float(v) for v in x], **({"start": True} if start else {})}
        records.append(FileRecord("in", 0, offset, 0, key.encode(), orjson.dumps(value)))
    outputs = [o for batch in (records[:7], records[7:30], records[30:]) for o in proc.process(batch)]
    assert len(outputs) == len(records) and not any(o.dead_letter for o in outputs)
    flat = [(key, s) for key, segs in segments.items() for s in range(len(segs))]
    oracle = expected_outputs_many(built(kind), [np.stack(segments[k][s]) for k, s in flat])
    expected = dict(zip(flat, oracle, strict=True))
    got = np.array([orjson.loads(o.value or b"")["y"] for o in outputs])
    want = np.stack([expected[(key, s)][t] for key, s, t in where])
    assert_matches(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_keras_engine_serves_the_zoo(loaded: dict[str, ServableModel], kind: str) -> None:
    _serve(_model(loaded, kind), "keras", kind, seed=1)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_engine_serves_the_zoo(loaded: dict[str, ServableModel], kind: str) -> None:
    _serve(_model(loaded, kind), "fast", kind, seed=2)


def test_self_check_masks_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up self-check feeds a masked model masked steps: without the copy's
    masked-step output (the RNN's h) it refuses the model instead of serving it wrong."""
    monkeypatch.setattr("daemon.inference.stateful.carry_masked_output", lambda layer: None)
    with pytest.raises(UnservableModelError, match="at step 1 differs"):
        load_model(built("masked"))


def test_parity_guard_masks_steps(loaded: dict[str, ServableModel]) -> None:
    """The fast engine's start-up parity guard feeds a masked model masked steps:
    a fast engine whose recurrent layers ignore the mask is caught."""
    model = _model(loaded, "masked")
    assert parity_guard(FastEngine(model), KerasEngine(model), model) is None
    unmasked = FastEngine(model)
    for op in unmasked.plan.ops:
        if isinstance(op, RecurrentOp):
            op.srcs = op.srcs[:1]  # the data input only: the mask is ignored
    reason = parity_guard(unmasked, KerasEngine(model), model)
    assert reason is not None and "differs" in reason


def test_causal_conv_buffers_are_states(loaded: dict[str, ServableModel]) -> None:
    """A causal Conv1D's last (kernel_size - 1) * dilation_rate inputs are one state
    tensor of the sequence (flattened, after the layer's position in the model),
    reported by state_shapes; a one-step Conv1D has none. The fast engine applies
    the buffer with its own op (no fallback)."""
    conv = _model(loaded, "causal_conv_lstm")
    assert conv.state_shapes == [(4 * 2,), (4,), (4,)]  # Conv1D(k3, d2) on 2 features; LSTM(4)
    assert [type(layer).__name__ for layer in conv.stateful_layers] == ["Conv1D", "LSTM"]
    stack = _model(loaded, "tcn")
    assert stack.state_shapes == [(1 * 3,), (4 * 4,)]  # k2 d1 on 3 features; k3 d2 on 4 filters
    for model, buffers in ((conv, 1), (stack, 2)):
        ops = FastEngine(model).plan.ops
        assert sum(isinstance(op, CausalConvOp) for op in ops) == buffers


@pytest.mark.parametrize("kind", ["causal_conv_lstm", "tcn"])
def test_causal_conv_state_survives_a_snapshot(loaded: dict[str, ServableModel], kind: str) -> None:
    """A sequence snapshotted mid-way (its conv buffers with its recurrent states)
    and restored continues as if uninterrupted, in either engine, from either
    engine's snapshot: the oracle's outputs on the whole sequence."""
    model = _model(loaded, kind)
    x = np.random.default_rng(3).standard_normal((9, model.n_features)).astype(np.float32)
    want = expected_outputs_many(built(kind), [x])[0]
    for first, second in (("fast", "keras"), ("keras", "fast"), ("fast", "fast")):
        a, b = make_engine(first, model)[0], make_engine(second, model)[0]
        assert (a.name, b.name) == (first, second)
        state = SequenceState()
        got = [a.step([state], x[t : t + 1])[0] for t in range(5)]
        state.n = 5
        restored, _ = SequenceState.from_snapshot(state.snapshot("m@0"))
        assert [t.shape for t in restored.tensors or []] == model.state_shapes
        got += [b.step([restored], x[t : t + 1])[0] for t in range(5, 9)]
        assert_matches(np.stack(got), want)
