"""The `formats` section: what each value format costs per event, decoding an input
and encoding its prediction, against JSON (LSTMD_INPUT_FORMAT, LSTMD_OUTPUT_FORMAT).

Not in the default run (`--sections formats`); no broker, no registry: the schemas
are given to the decoder as the registry would (`InputSchemas.learn`). The inputs
are events of `formats_features` features with a `step`, written as producers
write them (Avro by fastavro, JSON Schema values as JSON after the header); each
is decoded by `codec.decode` through the format's wire (the header, the schema's
reader, the field checks) and a prediction encoded by `codec.encode_prediction`.
In each of `formats_rounds` rounds the formats take turns on `formats_events`
events; a row per format gives the medians of the decode and encode microseconds
per event (this process's CPU time) and their sum over JSON's.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Sequence
from typing import Any

import fastavro
import numpy as np
import orjson

from daemon.core import codec
from daemon.devtools.bench.config import BenchConfig, Log, Row, aligned
from daemon.schemas import framing
from daemon.schemas.cache import SchemaCache
from daemon.schemas.registry import Connection, RegistryClient, Schema
from daemon.schemas.wire import InputSchemas, OutputSchema

FORMATS = ("json", "avro", "json-schema")
SCHEMA_ID = 1
OUTPUT_ID = 2
# An input as a typed producer writes it: the features and a step.
INPUT_AVRO: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "fields": [
        {"name": "x", "type": {"type": "array", "items": "double"}},
        {"name": "step", "type": ["null", "long"], "default": None},
    ],
}
INPUT_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"x": {"type": "array", "items": {"type": "number"}}, "step": {"type": "integer"}},
    "required": ["x"],
}


def inputs(fmt: str, events: int, features: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    values = [{"x": rng.normal(size=features).round(6).tolist(), "step": i} for i in range(events)]
    if fmt == "json":
        return [orjson.dumps(v) for v in values]
    if fmt == "json-schema":
        return [framing.frame(SCHEMA_ID, orjson.dumps(v)) for v in values]
    parsed = fastavro.parse_schema(INPUT_AVRO)
    out = []
    for v in values:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, parsed, v)
        out.append(framing.frame(SCHEMA_ID, buffer.getvalue()))
    return out


def wire(fmt: str) -> codec.Wire:
    """The daemon's wire for `fmt` in and out, its schemas known without a registry."""
    if fmt == "json":
        return codec.JSON_WIRE
    nowhere = RegistryClient(Connection("http://127.0.0.1:9"))  # never asked: the schemas are learnt
    schemas = InputSchemas(SchemaCache(nowhere), fmt)
    text = orjson.dumps(INPUT_AVRO if fmt == "avro" else INPUT_JSON_SCHEMA).decode()
    schemas.learn(Schema(SCHEMA_ID, "AVRO" if fmt == "avro" else "JSON", text))
    output = OutputSchema(None, fmt, "bench")
    output.id = OUTPUT_ID
    return codec.Wire(parse=schemas.parse, serialize=output.serialize, name=fmt)


def measure(fmt: str, values: Sequence[bytes], features: int) -> dict[str, float]:
    w = wire(fmt)
    key = b"seq-1"
    limit = 1 << 20
    started = time.process_time()
    events = [codec.decode(key, v, features, limit, w) for v in values]
    decoded = time.process_time() - started
    y = [0.123456789]
    started = time.process_time()
    for i, ev in enumerate(events):
        codec.encode_prediction(
            seq=ev.key, y=y, n=i + 1, end=False, partition=0, offset=i, model="bench@0", ts=1.0,
            step=ev.step, serialize=w.serialize,
        )  # fmt: skip
    encoded = time.process_time() - started
    n = len(values)
    return {
        "decode_us": decoded / n * 1e6,
        "encode_us": encoded / n * 1e6,
        "value_bytes": sum(map(len, values)) / n,
    }


class FormatsSection:
    """Each value format's decode and encode cost per event (module docstring)."""

    name = "formats"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        features = config.formats_features
        values = {f: inputs(f, config.formats_events, features, config.seed) for f in FORMATS}
        for f in FORMATS:  # warm-up: imports, first calls
            measure(f, values[f][:1000], features)
        runs: dict[str, list[dict[str, float]]] = {f: [] for f in FORMATS}
        for i in range(config.formats_rounds):
            log(f"bench: formats round {i + 1}/{config.formats_rounds} ({', '.join(FORMATS)}) ...")
            for f in FORMATS:
                runs[f].append(measure(f, values[f], features))
        medians = {f: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for f, rs in runs.items()}
        base = medians["json"]["decode_us"] + medians["json"]["encode_us"]
        rows: list[Row] = []
        for f, m in medians.items():
            rows.append(
                {
                    "section": self.name,
                    "model": "",
                    "engine": f,
                    "requested": f,
                    "events": config.formats_events,
                    "rounds": config.formats_rounds,
                    "features": features,
                    **m,
                    "vs_json": (m["decode_us"] + m["encode_us"]) / base,
                    "each": runs[f],
                    "note": "",
                }
            )
        return rows


def format_formats(rows: Sequence[Row]) -> list[str]:
    """The section's lines of the text table (none if it did not run)."""
    rows = [r for r in rows if r["section"] == "formats"]
    if not rows:
        return []
    lines: list[tuple[str, ...]] = [("format", "decode us/ev", "encode us/ev", "both vs json", "input B")]
    for r in rows:
        lines.append(
            (
                r["engine"],
                f"{r['decode_us']:.2f}",
                f"{r['encode_us']:.2f}",
                f"{r['vs_json']:.2f}",
                f"{r['value_bytes']:.0f}",
            )
        )
    first = rows[0]
    return [
        "",
        *aligned(lines),
        f"formats: {first['events']:,} events of {first['features']} features and a step per format and "
        f"round, medians of {first['rounds']} rounds; CPU time of codec.decode through the format's wire "
        "(header, schema reader, field checks) and of codec.encode_prediction",
    ]
