"""Prometheus metrics and health: one HTTP endpoint per process.

`/healthz` says whether the process is alive: its main loop keeps turning (a stalled loop
is worth a restart, an outage is not). `/readyz` says whether it can do its job now: 503
with the reasons while a dependency is down or the service is still starting.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

log = logging.getLogger(__name__)

# One name across services (refresh promotes, embed and serve load), so a dashboard or an
# alert can compare them: kind is "factors" or "cnn", service the one reporting.
MODEL_VERSION = Gauge("cofeat_model_version", "Id of the promoted / loaded version",
                      ["kind", "service"])


class Health:
    """Liveness (`beat` from the main loop) and readiness (named problems; none: ready)."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}
        self.lock = threading.Lock()
        self.last_beat: float | None = None  # None: this process has no loop that beats
        self.stall_s = 300.0

    def reset(self) -> None:
        """Forget every problem and beat (a test starting afresh in the same process)."""
        with self.lock:
            self.problems.clear()
        self.last_beat = None
        self.stall_s = 300.0

    def problem(self, name: str, detail: str) -> None:
        with self.lock:
            self.problems[name] = detail

    def clear(self, name: str) -> None:
        with self.lock:
            self.problems.pop(name, None)

    def set(self, ok: bool, detail: str) -> None:
        """The service's own readiness, as one problem among the others."""
        if ok:
            self.clear("service")
        else:
            self.problem("service", detail)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def detail(self) -> str:
        with self.lock:
            return "; ".join(self.problems.values()) or "ok"

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        if self.last_beat is None:
            return True, "alive"
        quiet = time.monotonic() - self.last_beat
        if quiet > self.stall_s:
            return False, f"stalled: the main loop has not turned for {quiet:.0f} s"
        return True, "alive"


health = Health()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/metrics"):
            self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif self.path.startswith("/healthz"):
            alive, detail = health.alive()
            self._reply(200 if alive else 503, detail.encode(), "text/plain")
        elif self.path.startswith("/readyz"):
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
