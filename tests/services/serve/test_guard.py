"""What `cofeat serve` refuses before it works: a wrong or missing bearer token before the
body is read (a real `cofeat serve` process, raw sockets), blank tokens at start-up, and
image queries beyond COFEAT_SERVE_IMAGE_CONCURRENCY (503 with Retry-After)."""

from __future__ import annotations

import io
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from typer.testing import CliRunner

from services.cli import app as cli
from tests.conftest import free_port, wait_for_port
from tests.helpers import wait_until
from tests.services.serve.test_app import env_of, serving
from tests.services.serve.world import FIRST_PROJECT, drop_world, make_world

TOKEN = "the-right-token"
DECLARED = 256 * 1024 * 1024  # what the refused uploads announce; far more than is sent
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def world(milvus_uri, tmp_path_factory):
    world = make_world(milvus_uri, tmp_path_factory.mktemp("data"))
    yield world
    drop_world(world.settings)


@pytest.fixture(scope="module")
def server(world):
    """`cofeat serve` with a token, and an upload limit above DECLARED: only the token
    check can stop it from reading what the uploads below announce."""
    port = free_port()
    env = {**os.environ, **env_of(world.settings), "COFEAT_SERVE_PORT": str(port),
           "COFEAT_API_TOKEN": TOKEN, "COFEAT_SERVE_MAX_UPLOAD_BYTES": str(2 * DECLARED)}
    env.pop("COFEAT_DATABASE_URL", None)
    cofeat = Path(sys.executable).with_name("cofeat")
    proc = subprocess.Popen([str(cofeat), "serve", "--host", "127.0.0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=60)
        yield port, psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def upload_head(port: int, authorization: str | None, expect: bool = False) -> bytes:
    lines = ["POST /v1/similar HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: multipart/form-data; boundary=xyz",
             f"Content-Length: {DECLARED}"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def push_until_answered(port: int, authorization: str | None) -> tuple[int, bytes]:
    """Sends the head, then body bytes as fast as the server takes them, until it answers
    or stops reading. Returns (body bytes sent, what came back)."""
    # A well-formed file part that never ends: a server that reads it keeps spooling it.
    part = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    chunk = b"\0" * (64 * 1024)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(upload_head(port, authorization) + part)
        while sent < DECLARED:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            if not writable:
                raise AssertionError("the server neither answered nor read for 10 s")
            try:
                sent += sock.send(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
        try:
            while data := sock.recv(65536):
                answer += data
        except ConnectionResetError:  # it closed with our unread bytes in its buffer
            pass
    return sent, answer


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}"],
                         ids=["missing", "wrong", "not-bearer"])
def test_refused_upload_is_not_read(server, authorization):
    port, proc = server
    before = proc.memory_info().rss
    sent, answer = push_until_answered(port, authorization)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"www-authenticate: bearer" in answer.lower()
    assert b"missing or wrong bearer token" in answer
    # What loopback socket buffers hold, not the 256 MiB announced.
    assert sent < 32 * MIB, f"the server took {sent / MIB:.0f} MiB of a refused upload"
    assert proc.memory_info().rss - before < 16 * MIB
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_refused_upload_that_expects_100_continue_sends_nothing(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(upload_head(port, "Bearer wrong-token", expect=True))
        answer = b""
        while data := sock.recv(65536):  # the server closes after its answer
            answer += data
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"100 Continue" not in answer


def test_the_right_token_still_reaches_the_routes(server):
    port, _ = server
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = httpx.get(f"{base}/v1/projects/{FIRST_PROJECT}/similar", headers=auth)
    assert response.status_code == 200, response.text
    # No CNN model (no database here): the upload was read and then refused for that.
    response = httpx.post(f"{base}/v1/similar", headers=auth,
                          files={"image": ("a.png", b"x" * 1000)})
    assert response.status_code == 503
    assert "no CNN model is live" in response.json()["detail"]
    refused = httpx.get(f"{base}/v1/projects/{FIRST_PROJECT}/similar")
    assert refused.status_code == 401
    assert refused.headers.get("connection") != "close"  # no body: keep-alive stays
    metrics = httpx.get(f"{base}/metrics").text
    assert 'cofeat_serve_requests_total{route="unauthorized",status="401"}' in metrics


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_blank_token_is_a_settings_error(world, value):
    env = {**env_of(world.settings), "COFEAT_API_TOKEN": value}
    result = CliRunner().invoke(cli, ["serve"], env=env)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("cofeat: invalid setting COFEAT_API_TOKEN: ")
    assert "empty or blank" in line


def test_token_with_surrounding_whitespace_is_a_settings_error(world):
    env = {**env_of(world.settings), "COFEAT_API_TOKEN": f"{TOKEN} "}
    result = CliRunner().invoke(cli, ["serve"], env=env)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "COFEAT_API_TOKEN" in line and TOKEN not in line  # never the secret itself


# -- the image concurrency limit ---------------------------------------------------------


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (20, 160, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def busy_queries() -> float:
    from services.serve.app import IMAGE_BUSY

    return IMAGE_BUSY._value.get()


def test_image_queries_beyond_the_limit_get_503_with_retry_after(world):
    settings = world.settings.model_copy(update={"serve_image_concurrency": 1,
                                                 "serve_image_wait_s": 0.2})
    files = {"image": ("a.png", png())}
    with serving(settings) as http:
        slots = http.app.state.image_slots
        busy = busy_queries()
        with http.portal.wrap_async_context_manager(slots.hold()):  # the one slot taken
            response = http.post("/v1/similar", files=files)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert "image search is busy" in response.json()["detail"]
            # Queries that run no CNN do not wait for image slots.
            assert http.get(f"/v1/projects/{FIRST_PROJECT}/similar").status_code == 200
        assert busy_queries() == busy + 1
        assert http.post("/v1/similar", files=files).status_code == 200
        for _ in range(3):  # failed queries give their slot back
            assert http.post("/v1/similar", files={"image": ("a", b"junk")}).status_code == 400
        assert slots.free.value == 1


def test_an_image_query_waits_for_a_slot_that_frees_in_time(world):
    from services.serve.app import IMAGE_QUERIES

    settings = world.settings.model_copy(update={"serve_image_concurrency": 1,
                                                 "serve_image_wait_s": 60})
    waiting = IMAGE_QUERIES.labels("waiting")
    with serving(settings) as http:
        held = http.portal.wrap_async_context_manager(http.app.state.image_slots.hold())
        held.__enter__()
        responses = []
        thread = threading.Thread(target=lambda: responses.append(
            http.post("/v1/similar", files={"image": ("a.png", png())})))
        thread.start()
        wait_until(lambda: waiting._value.get() == 1, 30, "the query to wait for the slot")
        held.__exit__(None, None, None)
        thread.join(60)
    assert responses[0].status_code == 200, responses[0].text
    assert waiting._value.get() == 0
