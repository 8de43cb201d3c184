"""A small client of the Schema Registry REST API (Confluent's; Apicurio's `ccompat`,
Karapace and Redpanda speak it too): the three calls lstmd makes, and the one
distinction it must never get wrong.

A registry that does not answer (refused, timed out, a 5xx, throttled) is an
outage, `RegistryUnavailable`: retried, and no record is dead-lettered for it. An
id the registry says it does not have is `SchemaNotFound`: that record's fault.
A registry that refuses us (credentials, a path with no registry behind it, a
schema it will not take) is `RegistryRefused`, a configuration error: exit 2
naming the variable, as for Kafka.

The standard library's HTTP client, not a framework: three JSON calls, basic auth
and TLS, each with a timeout.
"""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from daemon.errors import LstmdError, StartupError

#: The registry's own media type (every Confluent-compatible registry accepts it).
MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
#: Confluent's error codes (the JSON body of a 404): no such subject, no such schema.
SUBJECT_NOT_FOUND = 40401
SCHEMA_NOT_FOUND = 40403
#: One call's bound: a registry slower than this is treated as away for now.
TIMEOUT_S = 5.0


class RegistryUnavailable(LstmdError):
    """The registry did not answer: an outage, retried with backoff."""


class SchemaNotFound(LstmdError):
    """The registry has no schema of that id (or no such subject)."""


class RegistryRefused(StartupError):
    """The registry answered, and refused: the configuration must change (exit 2)."""


@dataclass(frozen=True, slots=True)
class Schema:
    """A registered schema: its id, type (AVRO, JSON, PROTOBUF) and text."""

    id: int
    type: str
    text: str
    references: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Connection:
    """Where the registry is and how to reach it (from the LSTMD_SCHEMA_REGISTRY_* settings)."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    timeout_s: float = TIMEOUT_S


class RegistryClient:
    """The registry calls lstmd makes; each raises one of this module's three errors."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._headers = {"Accept": MEDIA_TYPE, "Content-Type": MEDIA_TYPE}
        if connection.username is not None:
            token = f"{connection.username}:{connection.password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        self._context: ssl.SSLContext | None = None
        if connection.url.lower().startswith("https://"):
            self._context = ssl.create_default_context(
                cafile=str(connection.cafile) if connection.cafile else None
            )
            if connection.certfile is not None:
                self._context.load_cert_chain(
                    str(connection.certfile), str(connection.keyfile) if connection.keyfile else None
                )

    @property
    def url(self) -> str:
        return self.connection.url

    def schema(self, schema_id: int) -> Schema:
        """The schema of an id (GET /schemas/ids/{id})."""
        body = self._call("GET", f"/schemas/ids/{schema_id}")
        return _schema(schema_id, body)

    def lookup(self, subject: str, schema_type: str, text: str) -> int | None:
        """The id of `text` if it is registered under `subject` already, else None
        (POST /subjects/{subject}): a registry that lets us read but not write still
        serves a schema someone registered for us."""
        try:
            body = self._call("POST", f"/subjects/{_quoted(subject)}", _payload(schema_type, text))
        except SchemaNotFound:
            return None
        return int(body["id"])

    def register(self, subject: str, schema_type: str, text: str) -> int:
        """Register `text` under `subject` (POST /subjects/{subject}/versions): the id,
        the same as before if it was registered already. An incompatible schema is
        refused by the registry (409): `RegistryRefused`."""
        body = self._call("POST", f"/subjects/{_quoted(subject)}/versions", _payload(schema_type, text))
        return int(body["id"])

    def ping(self) -> None:
        """One cheap call that needs the credentials (GET /subjects): start-up checks
        that the URL is a registry and the credentials work before any record waits."""
        self._call("GET", "/subjects")

    def _call(self, method: str, path: str, payload: bytes | None = None) -> Any:
        c = self.connection
        request = urllib.request.Request(c.url + path, data=payload, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=c.timeout_s, context=self._context) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise _answer(exc, c.url, path) from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out, TLS
            # URLError wraps the cause; an error while reading the answer comes bare.
            reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise RegistryRefused(
                    f"LSTMD_SCHEMA_REGISTRY_CAFILE: the registry's certificate at {c.url} is not trusted "
                    f"({reason.verify_message})"
                ) from None
            no_certificate = isinstance(reason, ssl.SSLEOFError) and c.certfile is None
            alert = isinstance(reason, ssl.SSLError) and "ALERT" in str(reason.reason or "")
            if no_certificate or alert:
                # The registry ended the handshake: it wants a client certificate (TLS 1.3
                # says so by closing the connection), or another one.
                raise RegistryRefused(
                    f"LSTMD_SCHEMA_REGISTRY_CERTFILE/LSTMD_SCHEMA_REGISTRY_KEYFILE: the registry at {c.url} "
                    f"refused the TLS handshake ({reason})"
                ) from None
            raise RegistryUnavailable(f"{c.url}: {reason}") from None
        except orjson.JSONDecodeError:
            raise RegistryRefused(
                f"LSTMD_SCHEMA_REGISTRY_URL: {c.url}{path} answered something that is not JSON: "
                "is this a Schema Registry's URL?"
            ) from None


def _answer(exc: urllib.error.HTTPError, url: str, path: str) -> LstmdError:
    """What an HTTP error means for lstmd (see the module docstring)."""
    status = exc.code
    try:
        body = orjson.loads(exc.read() or b"{}")
    except (orjson.JSONDecodeError, OSError):
        body = {}
    detail = body.get("message") if isinstance(body, dict) else None
    code = body.get("error_code") if isinstance(body, dict) else None
    said = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status >= 500 or status in (408, 429):
        return RegistryUnavailable(f"{url}: {said}")
    if status in (401, 403):
        return RegistryRefused(
            f"LSTMD_SCHEMA_REGISTRY_USERNAME/LSTMD_SCHEMA_REGISTRY_PASSWORD: the registry at {url} "
            f"refused them ({said})"
        )
    if status == 404 and code in (SCHEMA_NOT_FOUND, SUBJECT_NOT_FOUND):
        return SchemaNotFound(said)
    if status == 404:
        return RegistryRefused(f"LSTMD_SCHEMA_REGISTRY_URL: no Schema Registry API at {url} ({path}: {said})")
    return RegistryRefused(f"the registry at {url} refused {path} ({said})")


def _schema(schema_id: int, body: Any) -> Schema:
    if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
        raise RegistryRefused(f"the registry's answer for schema {schema_id} has no schema text")
    references = tuple(body.get("references") or ())
    return Schema(schema_id, str(body.get("schemaType") or "AVRO"), body["schema"], references)


def _payload(schema_type: str, text: str) -> bytes:
    """A registration's body; AVRO is the default type and left out, as clients do."""
    body: dict[str, Any] = {"schema": text}
    if schema_type != "AVRO":
        body["schemaType"] = schema_type
    return orjson.dumps(body)


def _quoted(subject: str) -> str:
    return urllib.parse.quote(subject, safe="")
