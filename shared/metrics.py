"""Prometheus metrics: one HTTP endpoint per process (`/metrics`, plus `/healthz`)."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

log = logging.getLogger(__name__)

# One name across services (refresh promotes, embed and serve load), so a dashboard or an
# alert can compare them: kind is "factors" or "cnn", service the one reporting.
MODEL_VERSION = Gauge("cofeat_model_version", "Id of the promoted / loaded version",
                      ["kind", "service"])


class Health:
    """What `/healthz` answers: ok until a service marks itself unhealthy."""

    def __init__(self) -> None:
        self.ok = True
        self.detail = "ok"

    def set(self, ok: bool, detail: str) -> None:
        self.ok, self.detail = ok, detail


health = Health()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/metrics"):
            self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif self.path.startswith("/healthz"):
            self._reply(200 if health.ok else 503, health.detail.encode(), "text/plain")
        else:
            self._reply(404, b"not found", "text/plain")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def serve_metrics(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:
    """Start the endpoint in a daemon thread; port 0 means disabled."""
    if not port:
        return None
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    log.info("metrics on :%d/metrics", port)
    return server
