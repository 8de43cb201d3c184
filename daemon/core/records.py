"""The records that flow through the daemon: inputs in, outputs and state records out.

Pure data. Every output carries its kind and the partition and offset of the
input it answers, so delivery never has to parse a header back to know what a
record is or where it came from.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Protocol

from daemon.core import codec


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


class Kind(enum.Enum):
    """What an output record is: where it goes and what it counts as."""

    PREDICTION = "prediction"  # the output topic; counted, its latency measured
    NOTICE = "notice"  # the output topic: a state dropped before its end (eviction notice)
    DEAD_LETTER = "dead_letter"  # the dead-letter topic: a rejected input, unchanged


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
        """This dead letter with its value left out: too large for the topic."""
        return replace(
            self, value=None, headers=[*self.headers, codec.omitted_header(len(self.value or b""))]
        )


@dataclass(slots=True)
class StateRecord:
    """One sequence's state for the state topic (partition = the input's partition)."""

    partition: int
    key: str
    value: bytes | None  # None: a tombstone
