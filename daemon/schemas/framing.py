"""Confluent's wire format: magic byte 0, the schema id as a 4-byte big-endian
integer, then the payload. Every serializer of a Schema Registry writes it (Java,
Go, librdkafka's, Apicurio's in its Confluent mode), so it is what topics carry."""

from __future__ import annotations

import struct

MAGIC = 0
_HEADER = struct.Struct(">bI")
HEADER_BYTES = _HEADER.size


def schema_id(value: bytes) -> int | None:
    """The schema id a value names, or None if it is not in the wire format."""
    if len(value) < HEADER_BYTES or value[0] != MAGIC:
        return None
    return int(_HEADER.unpack_from(value)[1])


def frame(sid: int, payload: bytes) -> bytes:
    """A payload written under schema `sid`."""
    return _HEADER.pack(MAGIC, sid) + payload
