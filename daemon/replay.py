"""`lstmd replay`: the daemon's pipeline over a JSON-lines file, no broker.

Each input line is {"key": <sequence id>, "value": <record value object>},
taken as partition 0 with the line's 0-based index as offset; each output line
is an output record value. Rejected lines are written as dead-letter lines
(key, value and the DLQ headers) so nothing is silently lost.

`--plot`: a `SeriesCollector` sees every input record and prediction as they
pass, keeps the points of a few keys (each input's first feature paired with its
prediction's first value, by line index) and turns them into the panels that
daemon/plot.py draws. Pairing and grouping live here, where the file's format is
known, and need no matplotlib.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import orjson

from daemon.core.processor import Processor
from daemon.core.records import OutputRecord
from daemon.plot import Line, Panel

REPLAY_TOPIC = "replay"
# Lines are processed in batches like Kafka poll batches, so the fast engine
# batches across sequences here too.
BATCH_LINES = 500
#: Keys drawn by `--plot` unless `--plot-keys` names them: the input's first ones.
PLOT_KEYS = 4


@dataclass(slots=True, frozen=True)
class FileRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


def read_records(lines: Iterable[bytes]) -> Iterator[FileRecord]:
    """A line that is not a {"key", "value"} object becomes a keyless record, which
    the decoder rejects to the dead-letter output with the line as its value."""
    now_ms = int(time.time() * 1000)
    for offset, line in enumerate(lines):
        raw = line.rstrip(b"\r\n")
        key: bytes | None = None
        value: bytes | None = raw
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "value" in obj:
            key = obj["key"].encode() if isinstance(obj.get("key"), str) else None
            value = orjson.dumps(obj["value"])
        yield FileRecord(REPLAY_TOPIC, 0, offset, now_ms, key, value)


def replay(
    processor: Processor,
    source: BinaryIO,
    out: BinaryIO,
    dead: BinaryIO,
    collector: SeriesCollector | None = None,
) -> tuple[int, int]:
    """Run every line through the processor; return (predictions, rejected).
    `collector` (for `--plot`) sees each input record and each prediction."""
    predicted = rejected = 0
    batch: list[FileRecord] = []

    def flush() -> None:
        nonlocal predicted, rejected
        for rec in processor.process(batch):
            if rec.dead_letter:
                rejected += 1
                dead.write(_dead_line(rec) + b"\n")
            else:
                predicted += 1
                out.write((rec.value or b"") + b"\n")
                if collector is not None:
                    collector.add_output(rec.value or b"")
        batch.clear()

    for record in read_records(source):
        if collector is not None:
            collector.add_input(record)
        batch.append(record)
        if len(batch) >= BATCH_LINES:
            flush()
    flush()
    return predicted, rejected


def _dead_line(rec: OutputRecord) -> bytes:
    return orjson.dumps(
        {
            "key": rec.key.decode("utf-8", "replace") if rec.key is not None else None,
            "value": rec.value.decode("utf-8", "replace") if rec.value is not None else None,
            "headers": {k: v.decode() for k, v in rec.headers},
        }
    )


@dataclass(slots=True)
class KeySeries:
    """One key's points: each input line of the key that got a prediction, by line
    index (`steps`), with the input's x[0] and the prediction's y[0]. `resets`: where
    the key's state restarted (its end marker, a `start`, a step gap, an eviction),
    halfway between a sequence's last point and the next one's first."""

    key: str
    steps: list[int] = field(default_factory=list)
    inputs: list[float] = field(default_factory=list)
    predictions: list[float] = field(default_factory=list)
    resets: list[float] = field(default_factory=list)


class SeriesCollector:
    """The points of the keys to draw, gathered while a replay runs.

    The keys are `keys` if given, else the first `limit` keys of the input, by first
    appearance. Only their points are kept, so a long replay costs the memory of
    four sequences, not of the file. An input waits (by its line index, which each
    prediction carries as `offset`) until its prediction comes; a rejected line
    never gets one and is not drawn.
    """

    def __init__(self, keys: Sequence[str] | None = None, limit: int = PLOT_KEYS) -> None:
        self._fixed = keys is not None
        self._limit = limit
        self._series = {key: KeySeries(key) for key in keys or ()}
        self._waiting: dict[int, float] = {}

    def add_input(self, record: FileRecord) -> None:
        if record.key is None or record.value is None:
            return
        key = record.key.decode("utf-8", "replace")
        if key not in self._series:
            if self._fixed or len(self._series) >= self._limit:
                return
            self._series[key] = KeySeries(key)
        try:
            x = orjson.loads(record.value).get("x")
        except (orjson.JSONDecodeError, AttributeError):
            return
        # A pure end marker has no x (and gets no prediction); a bad x is rejected.
        if isinstance(x, list) and x and type(x[0]) in (int, float):
            self._waiting[record.offset] = float(x[0])

    def add_output(self, value: bytes) -> None:
        pred = orjson.loads(value)
        series = self._series.get(pred.get("seq"))
        # Eviction notices carry no y: the next prediction's n == 1 shows that reset.
        if series is None or not pred.get("y"):
            return
        x = self._waiting.pop(pred["offset"], None)
        if x is None:
            return
        if pred["n"] == 1 and series.steps:
            series.resets.append((series.steps[-1] + pred["offset"]) / 2)
        series.steps.append(pred["offset"])
        series.inputs.append(x)
        series.predictions.append(float(pred["y"][0]))

    def series(self) -> list[KeySeries]:
        """The keys in order (named, or of first appearance), each with its points."""
        return list(self._series.values())


def panels(series: Iterable[KeySeries]) -> list[Panel]:
    """One panel per key with points. The prediction shares the input's y axis when
    their ranges overlap (a forecast of the next reading, in its units); otherwise it
    gets a second axis (a score next to a reading), so neither is drawn flat."""
    out = []
    for s in series:
        if not s.steps:
            continue
        shared = min(s.predictions) <= max(s.inputs) and min(s.inputs) <= max(s.predictions)
        out.append(
            Panel(
                title=f"{s.key} ({len(s.steps)} predictions)",
                lines=(
                    Line("input x[0]", s.steps, s.inputs),
                    Line("prediction y[0]", s.steps, s.predictions, right=not shared),
                ),
                resets=s.resets,
            )
        )
    return out
