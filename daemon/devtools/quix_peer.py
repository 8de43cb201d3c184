"""The bench's peer: lstmd's job as a Quix Streams application.

`lstmd bench --peer` runs this file by path, as a subprocess, with one argument:
a JSON object (bootstrap, input, output, group, state_dir, weights, model). It
steps each key's sequence through the demo model's weights, a Keras LSTM step
and its Dense(1, sigmoid) head in NumPy, keeping the state (h, c, n) in Quix's
state store, and writes one prediction per event, shaped like lstmd's, to the
output topic.

Nothing imports it, and it imports nothing of lstmd: the interpreter that runs
it is usually a venv of its own, which has quixstreams and numpy but not lstmd
(quixstreams pins pydantic below the daemon's).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from quixstreams import Application, message_context

Vector = npt.NDArray[Any]  # float32 throughout; numpy's stubs widen some results to float64
Prediction = dict[str, Any]
Step = Callable[[dict[str, Any], str, int, Any, Any], Prediction]

HALF = np.float32(0.5)


def sigmoid(v: Vector) -> Vector:
    out: Vector = HALF * np.tanh(HALF * v) + HALF
    return out


def lstm_step_of(weights: Mapping[str, Vector], model: str) -> Step:
    """The per-event step over `weights` (the arrays peer_weights saves), for Quix's
    `apply(stateful=True, metadata=True)`."""
    kernel, recurrent, bias = weights["kernel"], weights["recurrent"], weights["bias"]
    dense_kernel, dense_bias = weights["dense_kernel"], weights["dense_bias"]
    units = recurrent.shape[0]
    zero = np.zeros(2 * units, dtype=np.float32)

    def lstm_step(value: dict[str, Any], key: str, timestamp: int, headers: Any, state: Any) -> Prediction:
        """One Keras LSTM step (gates i, f, c, o) and the Dense(1, sigmoid) head, in NumPy,
        the state (h, c) and the step count n in Quix's state store."""
        raw: bytes | None = state.get_bytes("hc")
        if raw is None:
            hc, n = zero, 0
        else:
            hc, n = np.frombuffer(raw, dtype=np.float32, count=2 * units), int.from_bytes(raw[-4:], "little")
        x = np.asarray(value["x"], dtype=np.float32)
        z = x @ kernel + hc[:units] @ recurrent + bias
        i = sigmoid(z[:units])
        f = sigmoid(z[units : 2 * units])
        g = np.tanh(z[2 * units : 3 * units])
        o = sigmoid(z[3 * units :])
        c = f * hc[units:] + i * g
        h = o * np.tanh(c)
        y = sigmoid(h @ dense_kernel + dense_bias)
        n += 1
        end = bool(value.get("end", False))
        if end:
            state.delete("hc")
        else:
            state.set_bytes("hc", h.tobytes() + c.tobytes() + n.to_bytes(4, "little"))
        ctx = message_context()
        return {
            "seq": key,
            "y": y.tolist(),
            "n": n,
            "end": end,
            "partition": ctx.partition,
            "offset": ctx.offset,
            "model": model,
            "ts": time.time(),
        }

    return lstm_step


def main(argv: list[str]) -> None:
    cfg = json.loads(argv[1])
    step = lstm_step_of(np.load(cfg["weights"]), cfg["model"])
    app = Application(
        broker_address=cfg["bootstrap"],
        consumer_group=cfg["group"],
        auto_offset_reset="earliest",
        state_dir=cfg["state_dir"],
        loglevel="WARNING",
        processing_guarantee="at-least-once",
    )
    source = app.topic(cfg["input"], key_deserializer="str", value_deserializer="json")
    sink = app.topic(cfg["output"], key_serializer="str", value_serializer="json")
    sdf = app.dataframe(source)
    sdf = sdf.apply(step, stateful=True, metadata=True)
    sdf.to_topic(sink)
    print("peer: running", flush=True)
    app.run()
    print("peer: stopped", flush=True)


if __name__ == "__main__":
    main(sys.argv)
