"""One HTTP port for Prometheus and Kubernetes: /metrics, /livez, /readyz.

Served from a daemon thread with the standard library: the endpoints are tiny
and must keep answering while the poll loop is busy in the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST


class Exposition(Protocol):
    """A process's metrics (daemon.ops.metrics.Metrics) or a pod's workers' together."""

    def exposition(self) -> bytes: ...


class Probes(Protocol):
    """A process's health (daemon.ops.health.Health) or a pod's workers' together."""

    def live(self) -> tuple[bool, str]: ...
    def ready(self) -> tuple[bool, str]: ...


class HttpServer:
    def __init__(self, port: int, metrics: Exposition, health: Probes, host: str = "0.0.0.0") -> None:
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, metrics.exposition()),
            "/livez": lambda: _probe(health.live()),
            "/readyz": lambda: _probe(health.ready()),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would drown the log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _probe(result: tuple[bool, str]) -> tuple[int, str, bytes]:
    ok, why = result
    return (200 if ok else 503), "text/plain", (why + "\n").encode()
