"""`lstmd demo`: the whole path on this machine, start to clean stop.

A local Apache Kafka broker, the demo model (a room-temperature forecaster,
see daemon/devtools/demo_model.py), a producer of interleaved sensor readings, `lstmd
run` as a real subprocess, its predictions printed as they arrive, a metrics
excerpt, then SIGTERM and a clean exit; last, a picture of four rooms' readings
and forecasts (a PNG in the temporary directory, its path printed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer

from daemon.devtools.localkafka import LocalKafka, cache_dir, create_topics, ensure_jars
from daemon.errors import MissingDependencyError
from daemon.plot import Line, Panel, draw

ROOMS_PER_SITE = 4
# The model needs a few hours of readings before its state knows the room.
WARM_UP = 24
# Readings go out at this rate, so the output reads like a live stream.
EVENTS_PER_SECOND = 400
METRICS_SHOWN = (
    "lstmd_events_consumed_total",
    "lstmd_predictions_produced_total",
    "lstmd_sequence_resets_total",
    "lstmd_active_sequences",
    "lstmd_consumer_lag",
    "lstmd_inference_duration_seconds_count",
    "lstmd_inference_duration_seconds_sum",
    "lstmd_end_to_end_latency_seconds_count",
    "lstmd_end_to_end_latency_seconds_sum",
    "lstmd_model_info",
)
#: Rooms in the picture (2 x 2 panels): more would make each too small to read.
PLOT_ROOMS = 4
PICTURE = "lstmd-demo.png"


@dataclass(frozen=True, slots=True)
class Forecast:
    """One prediction as the demo reads it (°C): the room's reading, the model's
    forecast of the next one, and the next reading that came. `n`: the reading's
    place in its series (1 right after a state reset)."""

    n: int
    reading: float
    predicted: float
    actual: float


def demo_model_path() -> Path:
    """Trained once per machine; the cache survives fresh clones."""
    from daemon.devtools.demo_model import make_demo_model

    path = cache_dir().parent / "demo-model-v2.keras"
    if not path.exists():
        print(f"training the demo model (once, cached at {path}) ...", flush=True)
        tmp = path.with_suffix(".tmp.keras")
        make_demo_model(tmp)
        tmp.replace(path)
    return path


def _stream(sequences: int, events: int) -> list[tuple[str, dict[str, object], float]]:
    """Interleaved readings: every room reports each tick; a room's series ends
    (end marker on its last reading) and a new one starts under the same id."""
    from daemon.devtools.demo_model import demo_series, to_features

    per_room = max(2, events // sequences)
    out: list[tuple[str, dict[str, object], float]] = []
    rooms = [f"site-{i // ROOMS_PER_SITE}/room-{i % ROOMS_PER_SITE}" for i in range(sequences)]
    # Each room's first series is cut short, so the demo shows a reset and a reuse.
    cut = {room: per_room // 2 + 7 * i for i, room in enumerate(rooms)}
    series = {room: demo_series(room, per_room + 1) for room in rooms}
    for t in range(per_room):
        for room in rooms:
            value: dict[str, object] = {"x": to_features(series[room][t])[0].tolist()}
            if t == cut[room] - 1:
                value["end"] = True
            out.append((room, value, float(series[room][t + 1])))
    return out[:events]


def run_demo(events: int = 2000, sequences: int = 8) -> int:
    print("lstmd demo: local Kafka + demo model + producer + lstmd run\n", flush=True)
    ensure_jars()
    model = demo_model_path()
    stream = _stream(sequences, events)
    with LocalKafka() as broker:
        broker.start()
        topics = {"in": "readings", "out": "predictions", "dlq": "readings.dlq"}
        create_topics(broker.bootstrap, {topics["in"]: 2, topics["out"]: 2, topics["dlq"]: 1})
        print(f"broker: {broker.bootstrap}  topics: {', '.join(topics.values())}")
        log_path = Path(tempfile.gettempdir()) / "lstmd-demo.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")} | {
            "LSTMD_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "LSTMD_INPUT_TOPIC": topics["in"],
            "LSTMD_OUTPUT_TOPIC": topics["out"],
            "LSTMD_DLQ_TOPIC": topics["dlq"],
            "LSTMD_GROUP_ID": "lstmd-demo",
            "LSTMD_CREATE_TOPICS": "true",  # the state topic, compacted
            # Port 0: the daemon binds a free port and logs it; no race with other programs.
            "LSTMD_MODEL_PATH": str(model),
            "LSTMD_HTTP_PORT": "0",
            "LSTMD_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "LSTMD_KAFKA_HEARTBEAT_INTERVAL_MS": "2000",
        }
        with open(log_path, "wb") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run"], env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
            try:
                port = _http_port(log_path, daemon)
                print(
                    f"daemon: pid {daemon.pid}, metrics on http://127.0.0.1:{port}/metrics, log {log_path}\n"
                )
                _wait_ready(port, daemon)
                code, forecasts = _drive(broker.bootstrap, topics, stream, port)
            finally:
                if daemon.poll() is None:
                    daemon.terminate()
                exit_code = daemon.wait(timeout=60)
            print(f"\ndaemon stopped by SIGTERM: exit code {exit_code}")
    print("broker stopped.")
    _picture(forecasts)
    print("Done.")
    return code or exit_code


def _picture(forecasts: Mapping[str, Sequence[Forecast]]) -> None:
    """The picture, or why there is none: the demo's point is the stream, so a
    missing matplotlib (an extra) is a note, not a failure."""
    path = Path(tempfile.gettempdir()) / PICTURE
    panels = forecast_panels(forecasts)
    if not panels:
        print("no picture: no predictions")
        return
    try:
        draw(
            panels,
            path,
            title="lstmd demo: room temperature, read every 15 minutes, and the forecast of each reading",
            xlabel="reading",
            ylabel="°C",
        )
    except MissingDependencyError as exc:
        print(f"no picture: {exc}")
        return
    rooms = ", ".join(panel.title.split(":")[0] for panel in panels)
    print(f"picture of the readings and forecasts of {rooms}: {path}")


def forecast_panels(forecasts: Mapping[str, Sequence[Forecast]], rooms: int = PLOT_ROOMS) -> list[Panel]:
    """The first `rooms` rooms (by name), one panel each, over the room's reading index.

    The forecast made at reading t is drawn at t + 1, over the reading it forecast (its
    actual next reading), so the gap between the two lines is the error; the reading
    line ends with the last actual next reading. Each series' start is a dashed line:
    after it, the state's warm-up (poor forecasts for a few hours), which the title's
    errors leave out, as the demo's summary does.
    """
    panels = []
    for room in sorted(forecasts)[:rooms]:
        fs = forecasts[room]
        if not fs:
            continue
        t = list(range(len(fs) + 1))
        warm = [f for f in fs if f.n > WARM_UP] or list(fs)
        error = float(np.mean([abs(f.predicted - f.actual) for f in warm]))
        naive = float(np.mean([abs(f.reading - f.actual) for f in warm]))
        panels.append(
            Panel(
                title=f"{room}: after warm-up, mean error {error:.3f} °C (naive {naive:.3f} °C)",
                lines=(
                    Line("reading", t, [f.reading for f in fs] + [fs[-1].actual]),
                    Line(
                        "forecast of it, made one reading (15 min) before", t[1:], [f.predicted for f in fs]
                    ),
                ),
                resets=[i - 0.5 for i, f in enumerate(fs) if f.n == 1 and i > 0],
            )
        )
    return panels


def _drive(
    bootstrap: str, topics: dict[str, str], stream: list[tuple[str, dict[str, object], float]], port: int
) -> tuple[int, dict[str, list[Forecast]]]:
    """Produce the stream, print predictions as they come, then the metrics; return
    the exit code and each room's forecasts, in order, for the picture."""
    from daemon.devtools.demo_model import from_output

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    consumer = KafkaConsumer(
        topics["out"], bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id="demo-viewer"
    )
    actual_next: dict[tuple[int, int], tuple[float, float]] = {}
    futures = []
    start = time.monotonic()
    for i, (room, value, nxt) in enumerate(stream):
        futures.append(
            (
                producer.send(topics["in"], key=room.encode(), value=orjson.dumps(value)),
                float(np.asarray(value["x"])[0]),
                nxt,
            )
        )
        if i % 50 == 49:
            time.sleep(max(0.0, start + (i + 1) / EVENTS_PER_SECOND - time.monotonic()))
    producer.flush()
    for fut, x, nxt in futures:
        meta = fut.get(timeout=30)  # type: ignore[no-untyped-call]
        actual_next[(meta.partition, meta.offset)] = (x, nxt)
    producer.close()
    print(
        f"produced {len(stream)} readings from {len({s[0] for s in stream})} rooms "
        f"in {time.monotonic() - start:.1f}s\n"
    )
    print(f"{'room':<16}{'n':>4}{'reading °C':>12}{'predicted next':>16}{'actual next':>13}")
    errors: list[float] = []
    naive: list[float] = []
    warm: list[tuple[float, float]] = []
    forecasts: dict[str, list[Forecast]] = {}
    deadline = time.monotonic() + 120
    while len(errors) < len(stream) and time.monotonic() < deadline:
        for recs in consumer.poll(timeout_ms=500).values():
            for rec in recs:
                pred = orjson.loads(rec.value)
                x, nxt = actual_next[(pred["partition"], pred["offset"])]
                reading = float(from_output(x))
                predicted = float(from_output(pred["y"][0]))
                forecasts.setdefault(pred["seq"], []).append(Forecast(pred["n"], reading, predicted, nxt))
                errors.append(abs(predicted - nxt))
                naive.append(abs(reading - nxt))
                if pred["n"] > WARM_UP:
                    warm.append((abs(predicted - nxt), abs(reading - nxt)))
                if len(errors) % max(1, len(stream) // 20) == 1 or pred["end"]:
                    tag = "  (end of series: state reset)" if pred["end"] else ""
                    print(
                        f"{pred['seq']:<16}{pred['n']:>4}{reading:>12.2f}{predicted:>16.2f}{nxt:>13.2f}{tag}"
                    )
    consumer.close()
    print(f"\n{len(errors)} predictions for {len(stream)} readings.")
    print(
        f"Mean absolute error of the next-reading forecast: {np.mean(errors):.3f} °C overall "
        f"(naive 'same as now': {np.mean(naive):.3f} °C); after each series' first {WARM_UP} "
        f"readings (the state's warm-up): {np.mean([w[0] for w in warm]):.3f} °C "
        f"(naive {np.mean([w[1] for w in warm]):.3f} °C)"
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    print(f"\nmetrics excerpt (GET /metrics, {len(text)} bytes):")
    for line in text.splitlines():
        if line.startswith(METRICS_SHOWN):
            print("  " + line)
    return (0 if len(errors) == len(stream) else 1), forecasts


def _wait_ready(port: int, daemon: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Stream only once /readyz says the model is loaded and partitions are assigned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    print("daemon ready (GET /readyz: 200)\n", flush=True)
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the daemon did not become ready (exit code {daemon.poll()})")


def _http_port(log_path: Path, daemon: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """The port from the daemon's own `http_listening` log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.poll() is None:
        for line in log_path.read_bytes().splitlines():
            if b'"http_listening"' in line:
                return int(orjson.loads(line)["port"])
        time.sleep(0.2)
    raise RuntimeError(f"the daemon did not start its HTTP server (exit code {daemon.poll()})")
