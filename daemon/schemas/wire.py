"""The value formats of a run (LSTMD_INPUT_FORMAT, LSTMD_OUTPUT_FORMAT) as the one
`codec.Wire` the processor uses, and what must happen before it decodes or writes.

The registry is asked outside the processor only: `InputSchemas.resolve` fetches
the schemas a batch names before the batch is processed (so an outage holds the
batch back whole, and a record is dead-lettered only for the registry's own
answer), and `OutputSchema.register` runs at start-up. Decoding itself is pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.core import codec
from daemon.core.records import InputRecord
from daemon.errors import RecordRejected
from daemon.schemas import formats, framing
from daemon.schemas.cache import SchemaCache
from daemon.schemas.registry import Connection, RegistryClient, Schema


class InputSchemas:
    """The input's schemas by id, and the reader of each."""

    def __init__(self, cache: SchemaCache, input_format: str) -> None:
        self.cache = cache
        self.expected = formats.SCHEMA_TYPES[input_format]
        self._readers: dict[int, formats.Reader] = {}
        self._unknown: set[int] = set()  # ids the registry said it does not have

    def resolve(self, records: Iterable[InputRecord]) -> None:
        """Fetch the schema of every id the records name that this process has not
        read yet. Raises RegistryUnavailable: nothing is decoded then, and the caller
        holds the records back."""
        seen: set[int] = set()
        for rec in records:
            value = rec.value
            if value is None:
                continue
            sid = framing.schema_id(value)
            if sid is None or sid in seen or sid in self._readers:
                continue
            seen.add(sid)
            if sid in self._unknown and self.cache.missing(sid):
                continue
            schema = self.cache.fetch(sid)
            if schema is None:
                self._unknown.add(sid)
            else:
                self._unknown.discard(sid)
                self._readers[sid] = formats.reader(schema, self.expected)

    def learn(self, schema: Schema) -> None:
        """A schema known without asking the registry (`lstmd bench`)."""
        self._readers[schema.id] = formats.reader(schema, self.expected)

    def parse(self, value: bytes) -> Any:
        """A value's object (`codec.Parse`): the resolved schema's reader on its payload."""
        sid = framing.schema_id(value)
        if sid is None:
            shown = f"byte 0 is {value[0]}" if value else "the value is empty"
            raise RecordRejected(
                formats.NOT_WIRE_FORMAT,
                f"not in the Schema Registry wire format (magic byte 0, a 4-byte schema id): {shown}",
            )
        read = self._readers.get(sid)
        if read is None:
            if sid in self._unknown:
                detail = f"schema id {sid} is not in the registry at {self.cache.client.url}"
                raise RecordRejected(formats.UNKNOWN_SCHEMA, detail)
            # `resolve` runs before every batch: reaching this is a bug, not a record's fault.
            raise LookupError(f"schema id {sid} was not resolved before decoding")
        return read(value[framing.HEADER_BYTES :])


class OutputSchema:
    """The output's schema, registered under the output topic's value subject
    (TopicNameStrategy: `<topic>-value`) at start-up, or found there already."""

    def __init__(self, client: RegistryClient | None, output_format: str, topic: str) -> None:
        """`client` None: the id is set by the caller (`lstmd bench`), not registered."""
        self.client = client
        self.subject = f"{topic}-value"
        self.type, self.text = formats.output_schema(output_format)
        self._write = formats.writer(output_format)
        self.id: int | None = None

    def register(self) -> int:
        """The schema's id: looked up first (a registry that lets us read only still
        serves a schema registered for us), else registered. Raises RegistryRefused
        (incompatible with the subject's versions, not allowed) or RegistryUnavailable."""
        assert self.client is not None
        found = self.client.lookup(self.subject, self.type, self.text)
        self.id = found if found is not None else self.client.register(self.subject, self.type, self.text)
        return self.id

    def serialize(self, fields: dict[str, Any]) -> bytes:
        """An output value (`codec.Serialize`): after `register`."""
        assert self.id is not None, "register() at start-up first"
        return framing.frame(self.id, self._write(fields))


@dataclass
class ValueFormats:
    """A run's formats: the processor's wire, and the registry work around it."""

    wire: codec.Wire
    client: RegistryClient | None = None
    inputs: InputSchemas | None = None
    output: OutputSchema | None = None

    @property
    def url(self) -> str | None:
        return self.client.url if self.client is not None else None


def value_formats(settings: Settings, found: codec.Fields, directory: Path | None = None) -> ValueFormats:
    """The formats the settings name, with the input's fields `found` where they are;
    no I/O (the registry is asked later). `directory`: the pod's shared directory,
    where workers share the schemas they fetch."""
    if settings.input_format == "json" and settings.output_format == "json":
        return ValueFormats(codec.Wire(fields=found))
    assert settings.schema_registry_url is not None  # config: required with these formats
    client = RegistryClient(
        Connection(
            settings.schema_registry_url,
            settings.schema_registry_username,
            settings.registry_password(),
            settings.schema_registry_cafile,
            settings.schema_registry_certfile,
            settings.schema_registry_keyfile,
        )
    )
    inputs = None
    parse: codec.Parse = codec.parse_json
    name = "JSON"
    if settings.input_format != "json":
        inputs = InputSchemas(SchemaCache(client, directory), settings.input_format)
        parse = inputs.parse
        name = settings.input_format
    output = None
    serialize: codec.Serialize = codec.JSON_WIRE.serialize
    if settings.output_format != "json":
        output = OutputSchema(client, settings.output_format, settings.output_topic)
        serialize = output.serialize
    wire = codec.Wire(parse=parse, serialize=serialize, fields=found, name=name)
    return ValueFormats(wire, client, inputs, output)
