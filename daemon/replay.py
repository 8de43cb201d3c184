"""`lstmd replay`: the daemon's pipeline over a JSON-lines file, no broker.

Each input line is {"key": <sequence id>, "value": <record value object>},
taken as partition 0 with the line's 0-based index as offset; each output line
is an output record value. Rejected lines are written as dead-letter lines
(key, value and the DLQ headers) so nothing is silently lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import orjson

from daemon.core.processor import Processor
from daemon.core.records import OutputRecord

REPLAY_TOPIC = "replay"
# Lines are processed in batches like Kafka poll batches, so the fast engine
# batches across sequences here too.
BATCH_LINES = 500


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


def replay(processor: Processor, source: BinaryIO, out: BinaryIO, dead: BinaryIO) -> tuple[int, int]:
    """Run every line through the processor; return (predictions, rejected)."""
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
        batch.clear()

    for record in read_records(source):
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
