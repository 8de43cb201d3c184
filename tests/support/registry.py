"""A stand-in Schema Registry: the documented subset of Confluent's REST API that
lstmd and Confluent's own serializers call (`/subjects`, `/schemas/ids/{id}`,
`/subjects/{s}` lookup, `/subjects/{s}/versions` register and read, a refused
registration as 409), in memory, on a real HTTP port, with the switches tests
need: an outage (stopped and started again on its port), basic-auth credentials.

Tests only, never shipped. No real registry starts from the package registries
reachable here (Apicurio Registry was tried, README "Avro and JSON Schema"), so
the unit and broker tests use this one; the input itself is written by
Confluent's serializers (confluent-kafka's schema_registry) talking to it.
"""

from __future__ import annotations

import base64
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"


@dataclass
class _Store:
    schemas: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (type, text)
    subjects: dict[str, list[int]] = field(default_factory=dict)  # subject -> ids by version
    calls: Counter[str] = field(default_factory=Counter)  # "GET /schemas/ids/{id}" -> count
    username: str | None = None
    password: str | None = None
    refuse: set[str] = field(default_factory=set)  # subjects whose registrations answer 409

    def register(self, subject: str, schema_type: str, text: str) -> int:
        same = [sid for sid, known in self.schemas.items() if known == (schema_type, text)]
        sid = same[0] if same else max(self.schemas, default=0) + 1
        self.schemas[sid] = (schema_type, text)
        versions = self.subjects.setdefault(subject, [])
        if sid not in versions:
            versions.append(sid)
        return sid


class StandInRegistry:
    """Start with `start()`; `url` is its base URL. `stop()` and `start()` again on
    the same port make an outage."""

    def __init__(
        self, username: str | None = None, password: str | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        """`tls`: serve https with this server context (a client certificate required if it says so)."""
        self.store = _Store(username=username, password=password)
        self.port = 0
        self.tls = tls
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def calls(self) -> Counter[str]:
        return self.store.calls

    def register(self, subject: str, schema_type: str, schema: Any) -> int:
        """Register a schema directly (as another team's producer would have)."""
        text = schema if isinstance(schema, str) else orjson.dumps(schema).decode()
        return self.store.register(subject, schema_type, text)

    def start(self) -> StandInRegistry:
        store = self.store

        class Handler(_Handler):
            pass

        Handler.store = store
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StandInRegistry:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    store: _Store

    def log_message(self, *_: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        parts = [unquote(p) for p in path.strip("/").split("/")]
        key = f"{method} /{'/'.join(parts)}"
        self.store.calls[key] += 1
        if not self._authorized():
            self._send(401, {"error_code": 40101, "message": "Unauthorized"})
            return
        body: Any = None
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            body = orjson.loads(self.rfile.read(length) or b"{}")
        store = self.store
        if method == "GET" and parts == ["subjects"]:
            self._send(200, sorted(store.subjects))
        elif method == "GET" and len(parts) == 3 and parts[:2] == ["schemas", "ids"]:
            known = store.schemas.get(int(parts[2]))
            if known is None:
                self._send(404, {"error_code": 40403, "message": "Schema not found"})
            else:
                answer = {"schema": known[1]}
                if known[0] != "AVRO":
                    answer["schemaType"] = known[0]
                self._send(200, answer)
        elif method == "POST" and len(parts) == 2 and parts[0] == "subjects":
            schema_type, text = body.get("schemaType", "AVRO"), body["schema"]
            for version, sid in enumerate(store.subjects.get(parts[1], []), start=1):
                if store.schemas[sid] == (schema_type, text):
                    self._send(200, {"subject": parts[1], "id": sid, "version": version, "schema": text})
                    return
            if parts[1] not in store.subjects:
                self._send(404, {"error_code": 40401, "message": "Subject not found"})
            else:
                self._send(404, {"error_code": 40403, "message": "Schema not found"})
        elif method == "POST" and len(parts) == 3 and parts[0] == "subjects" and parts[2] == "versions":
            if parts[1] in store.refuse:
                self._send(409, {"error_code": 409, "message": "Schema being registered is incompatible"})
                return
            sid = store.register(parts[1], body.get("schemaType", "AVRO"), body["schema"])
            self._send(200, {"id": sid})
        elif method == "GET" and len(parts) == 4 and parts[0] == "subjects" and parts[2] == "versions":
            ids = store.subjects.get(parts[1])
            if not ids:
                self._send(404, {"error_code": 40401, "message": "Subject not found"})
                return
            version = len(ids) if parts[3] == "latest" else int(parts[3])
            sid = ids[version - 1]
            schema_type, text = store.schemas[sid]
            self._send(
                200,
                {
                    "subject": parts[1],
                    "id": sid,
                    "version": version,
                    "schema": text,
                    "schemaType": schema_type,
                },
            )
        else:
            self._send(404, {"error_code": 404, "message": f"no route {key}"})

    def _authorized(self) -> bool:
        if self.store.username is None:
            return True
        expected = base64.b64encode(f"{self.store.username}:{self.store.password}".encode()).decode()
        return self.headers.get("Authorization") == f"Basic {expected}"

    def _send(self, status: int, body: Any) -> None:
        data = orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", MEDIA_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
