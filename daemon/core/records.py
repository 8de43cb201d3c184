"""The records that flow through the daemon: inputs in, outputs and state records out.

Pure data. Every output carries its kind and the partition and offset of the
input it answers, so delivery never has to parse a header back to know what a
record is or where it came from.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from daemon.core import codec
from daemon.core.state import state_key


class InputRecord(Protocol):
    """What the processor reads of a record: kafka-python's ConsumerRecord fits."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


class Kind(enum.Enum):
    """What an output record is: where it goes and what it counts as."""

    PREDICTION = "prediction"  # the output topic; counted, its latency measured
    NOTICE = "notice"  # the output topic: a state dropped before its end (eviction notice)
    DEAD_LETTER = "dead_letter"  # the dead-letter topic: a rejected input, unchanged
    SHADOW = "shadow"  # the shadow topic: a shadow model's prediction or notice


@dataclass(slots=True)
class OutputRecord:
    """One record to publish. `partition` and `offset` are those of the input it
    answers (a notice: of the state's watermark)."""

    kind: Kind
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int
    source_timestamp_ms: int
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def dead_letter(self) -> bool:
        return self.kind is Kind.DEAD_LETTER

    @property
    def notice(self) -> bool:
        return self.kind is Kind.NOTICE

    def without_value(self) -> OutputRecord:
        """This dead letter made smaller, for a topic or producer that refused it as too
        large: its value left out (its size in a header); asked again, its key and the
        input's headers too (bare: only the daemon's headers, which always fit)."""
        names = {name for name, _ in self.headers}
        if self.value and codec.VALUE_OMITTED not in names:
            shrunk = replace(
                self,
                value=None,
                headers=[*self.headers, (codec.VALUE_OMITTED, str(len(self.value or b"")).encode())],
            )
        else:
            ours = [(n, v) for n, v in self.headers if n.startswith(codec.HEADER_PREFIX)]
            carried = len(self.headers) - len(ours)
            shrunk = replace(
                self,
                key=None,
                headers=[
                    *ours,
                    (codec.KEY_OMITTED, str(len(self.key or b"")).encode()),
                    (codec.HEADERS_OMITTED, str(carried).encode()),
                ],
            )
        return shrunk.sendable()

    def sendable(self) -> OutputRecord:
        """This record as a client can send it: Kafka has no record without both key
        and value (kafka-python raises ValueError), so a dead letter left with neither
        gets an empty value; `lstmd.value.null` says when the input's value was null
        (rather than left out, which `lstmd.value.omitted` says)."""
        if self.key is not None or self.value is not None:
            return self
        names = {name for name, _ in self.headers}
        null = [] if codec.VALUE_OMITTED in names else [(codec.VALUE_NULL, b"true")]
        return replace(self, value=b"", headers=[*self.headers, *null])

    @property
    def bare(self) -> bool:
        """A dead letter shrunk to the daemon's headers alone: it cannot shrink further."""
        return any(name == codec.KEY_OMITTED for name, _ in self.headers)

    @property
    def size(self) -> int:
        """Bytes of its key, value and headers (Kafka adds a few per record and batch)."""
        headers = sum(len(name.encode()) + len(value) for name, value in self.headers)
        return len(self.key or b"") + len(self.value or b"") + headers


def dead_letter(rec: InputRecord, error_headers: Sequence[tuple[str, bytes]], limit: int) -> OutputRecord:
    """The dead letter of an input: its key, value and headers unchanged, then the
    daemon's headers naming the error; shrunk (`without_value`) until its key, value
    and headers fit in `limit` bytes, and always sendable (see the README's dead
    letters). An input header named lstmd.* is left out (say, a dead letter replayed
    into the input: its old error is not this one); a header with a null value is
    copied with an empty one (kafka-python sends no null header value)."""
    carried = [
        (name, value if value is not None else b"")
        for name, value in rec.headers or ()
        if not name.startswith(codec.HEADER_PREFIX)
    ]
    letter = OutputRecord(
        kind=Kind.DEAD_LETTER,
        key=rec.key,
        value=rec.value,
        partition=rec.partition,
        offset=rec.offset,
        source_timestamp_ms=rec.timestamp,
        headers=[*carried, *error_headers],
    ).sendable()
    while letter.size > limit and not letter.bare:
        letter = letter.without_value()
    return letter


@dataclass(slots=True)
class StateRecord:
    """One sequence's state for the state topic (partition = the input's partition).
    `owner`: the tag of a model following the partition without serving it (a shadow,
    a candidate); its states live under keys of their own (`state_key`), and so does
    its marker (`following`: its states of the partition are exact)."""

    partition: int
    key: str
    value: bytes | None  # None: a tombstone
    owner: str | None = None
    following: bool = False

    @property
    def wire_key(self) -> bytes:
        return state_key(self.key, self.owner, following=self.following)
