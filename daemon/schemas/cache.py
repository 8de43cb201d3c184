"""Each schema fetched once per pod, however many workers ask.

In memory for the process; and, in a pod of several worker processes, in the
supervisor's directory too: a file per id, fetched by the first worker that takes
the id's lock, read by the others (the registry sees one call per id, not one per
worker, when a pod starts on a topic of many schema versions). Schemas under an
id never change (the registry's promise), so nothing here expires but the
registry's "no such id" answers, asked again after a while.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from daemon.schemas.registry import RegistryClient, Schema, SchemaNotFound

#: An id the registry said it does not have is asked again after this long (its
#: records are dead-lettered meanwhile: a registry's answer, not an outage).
NOT_FOUND_TTL_S = 60.0


class SchemaCache:
    """Schemas by id: memory, then the pod's shared files, then the registry."""

    def __init__(
        self,
        client: RegistryClient,
        directory: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.directory = directory
        self.clock = clock
        self.fetched = 0  # schemas fetched from the registry (lstmd_schema_fetches)
        self._schemas: dict[int, Schema] = {}
        self._missing: dict[int, float] = {}  # id -> when it may be asked again

    def get(self, schema_id: int) -> Schema | None:
        """The schema if known here already; no I/O."""
        return self._schemas.get(schema_id)

    def missing(self, schema_id: int) -> bool:
        """True while the registry's "no such id" for it stands; no I/O."""
        until = self._missing.get(schema_id)
        return until is not None and self.clock() < until

    def fetch(self, schema_id: int) -> Schema | None:
        """The schema of an id (None: the registry has none). Raises
        RegistryUnavailable when the registry does not answer."""
        known = self._schemas.get(schema_id)
        if known is not None:
            return known
        if self.missing(schema_id):
            return None
        try:
            schema = self._shared(schema_id) if self.directory is not None else self._ask(schema_id)
        except SchemaNotFound:
            self._missing[schema_id] = self.clock() + NOT_FOUND_TTL_S
            return None
        self._missing.pop(schema_id, None)
        self._schemas[schema_id] = schema
        return schema

    def _ask(self, schema_id: int) -> Schema:
        schema = self.client.schema(schema_id)
        self.fetched += 1
        return schema

    def _shared(self, schema_id: int) -> Schema:
        """Through the pod's directory: one worker asks, under the id's lock; the others
        wait on the lock and read its file."""
        assert self.directory is not None
        path = self.directory / f"schema-{schema_id}.json"
        with open(self.directory / f"schema-{schema_id}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if path.exists():
                    return _read(path)
                schema = self._ask(schema_id)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(
                    orjson.dumps(
                        {"id": schema.id, "type": schema.type, "text": schema.text, "refs": schema.references}
                    )
                )
                tmp.replace(path)  # whole or absent, whoever reads it
                return schema
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> Schema:
    body = orjson.loads(path.read_bytes())
    return Schema(int(body["id"]), str(body["type"]), str(body["text"]), tuple(body["refs"]))
