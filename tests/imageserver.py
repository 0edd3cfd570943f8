"""A real HTTP server on loopback for image tests, run as its own process:

    python -m tests.imageserver PORT DIRECTORY [CERT KEY]   (with CERT and KEY: HTTPS)

GET /files/NAME              the file (keep-alive, Content-Length)
GET /slow/SECONDS/NAME       waits, then the file
GET /drip/NAME               the headers, then one byte every 0.2 s
GET /status/CODE             an empty response with that status
GET /flaky/N/NAME            HTTP 503 for the first N requests of that path, then the file
GET /big/BYTES               that many bytes, with Content-Length
GET /chunked/BYTES           that many bytes, chunked (no Content-Length)
GET /redirect?to=URL         302 to URL (without `to`: to itself, for ever)
GET /stats                   {"requests": {path: count}, "max_in_flight": n}; POST resets
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]


class State:
    def __init__(self, directory: Path):
        self.directory = directory
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a CDN
    state: State

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        with self.state.lock:
            self.state.requests.clear()
            self.state.max_in_flight = 0
        self._send(200, b"{}")

    def do_GET(self) -> None:  # noqa: N802
        state, url = self.state, urlsplit(self.path)
        if url.path == "/stats":
            with state.lock:
                body = json.dumps({"requests": state.requests,
                                   "max_in_flight": state.max_in_flight}).encode()
            return self._send(200, body)
        with state.lock:
            count = state.requests[url.path] = state.requests.get(url.path, 0) + 1
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._route(url, count)
        finally:
            with state.lock:
                state.in_flight -= 1

    def _route(self, url, count: int) -> None:
        parts = url.path.strip("/").split("/")
        kind, rest = parts[0], parts[1:]
        if kind == "files":
            return self._file(rest[0])
        if kind == "slow":
            time.sleep(float(rest[0]))
            return self._file(rest[1])
        if kind == "flaky":
            return self._send(503, b"") if count <= int(rest[0]) else self._file(rest[1])
        if kind == "status":
            return self._send(int(rest[0]), b"")
        if kind == "big":
            return self._send(200, b"\0" * int(rest[0]))
        if kind == "chunked":
            return self._chunked(int(rest[0]))
        if kind == "drip":
            return self._drip(rest[0])
        if kind == "truncated":  # promises the whole file, sends half, hangs up
            body = (self.state.directory / rest[0]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return None
        if kind == "garbage":  # not HTTP at all
            self.wfile.write(b"\x00\xffnot a status line\r\n\r\n")
            self.close_connection = True
            return None
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(url.query).get("to", [url.path])[0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send(404, b"")

    def _file(self, name: str) -> None:
        path = self.state.directory / name
        if not path.is_file():
            return self._send(404, b"")
        return self._send(200, path.read_bytes(), "image/png")

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunked(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\0" * 65536
        try:
            while size > 0:
                part = block[:min(size, len(block))]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                size -= len(part)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading: that is the point

    def _drip(self, name: str) -> None:
        body = (self.state.directory / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


def serve(port: int, directory: Path, tls: tuple[str, str] | None = None) -> None:
    Handler.state = State(directory)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


class ImageServer:
    """The server in a subprocess; `url(path)` names one of its routes."""

    def __init__(self, port: int, directory: Path, tls: tuple[Path, Path] | None = None):
        self.port, self.directory = port, Path(directory)
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.imageserver", str(port),
                                      str(directory), *map(str, tls or ())], cwd=ROOT)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("the image server did not start") from None
                time.sleep(0.05)

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def stats(self) -> dict:
        unverified = ssl._create_unverified_context()  # the test's own self-signed server
        with urllib.request.urlopen(self.url("stats"), timeout=5, context=unverified) as reply:
            return json.loads(reply.read())

    def requests(self, path: str) -> int:
        return self.stats()["requests"].get("/" + path.lstrip("/"), 0)

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url("stats"), data=b"",
                                                      method="POST"), timeout=5).close()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3:5]) or None)
