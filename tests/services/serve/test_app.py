"""The HTTP API (TestClient), `cofeat search` and one real `cofeat serve` process."""

from __future__ import annotations

import hmac
import io
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr
from typer.testing import CliRunner

from services.cli import app as cli
from services.serve.app import create_app
from services.serve.live import LiveModel, ModelHolder
from shared.client import CofeatClient, epoch_ms
from tests.conftest import free_port, wait_for_port
from tests.helpers import wait_until
from tests.services.embedder.test_outage import Proxy
from tests.services.serve.world import FIRST_PROJECT, FIRST_USER, drop_world, make_world

SIMILAR = "/v1/projects/{}/similar"
FOR_USER = "/v1/users/{}/recommendations"


@pytest.fixture(scope="module")
def world(milvus_uri, tmp_path_factory):
    world = make_world(milvus_uri, tmp_path_factory.mktemp("data"),
                       serve_max_upload_bytes=4096)
    yield world
    drop_world(world.settings)


def tiny_model():
    from shared.vision import ModelConfig, build_model

    return build_model(ModelConfig(backbone="small", out_dim=16, image_size=32)).eval()


def serving(settings, live: bool = True) -> TestClient:
    """A TestClient (use it in `with`) for an app whose model is already loaded."""
    client = CofeatClient.from_settings(settings)
    models = ModelHolder(settings, client)
    models.live = LiveModel(1, tiny_model()) if live else None
    return TestClient(create_app(settings, client, models, watch=False))


@pytest.fixture(scope="module")
def http(world):
    with serving(world.settings) as http:
        yield http


def ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [hit["project_id"] for hit in response.json()["results"]]


def test_similar_to_project(world, http):
    row = 4
    expected = world.nearest(world.projects[row])
    assert ids(http.get(SIMILAR.format(FIRST_PROJECT + row), params={"k": 5})) == expected[1:6]
    keep = world.owners != world.owners[row]
    response = http.get(SIMILAR.format(FIRST_PROJECT + row),
                        params={"k": 5, "exclude_owner": "true"})
    assert ids(response) == world.nearest(world.projects[row], keep)[:5]
    assert response.json()["query"] == {"project_id": FIRST_PROJECT + row, "k": 5,
                                        "exclude_owner": True}


def test_recommendations(world, http):
    row = 2
    assert ids(http.get(FOR_USER.format(FIRST_USER + row))) == world.nearest(world.users[row])[:20]
    new = ids(http.get(FOR_USER.format(FIRST_USER + row), params={"new_only": True, "k": 100}))
    assert new == world.nearest(world.users[row], np.arange(300) < 168)[:100]


def test_recommendations_published_since(world, http):
    row, since = 4, datetime.now(UTC) - timedelta(hours=30)
    keep = world.published >= epoch_ms(since)
    assert 25 <= keep.sum() <= 31  # the window is what this test is about: not empty
    for given in (since.isoformat(), since.replace(tzinfo=None).isoformat()):  # naive: UTC
        response = http.get(FOR_USER.format(FIRST_USER + row),
                            params={"published_since": given, "k": 100, "new_only": True})
        assert ids(response) == world.nearest(world.users[row], keep)
        assert response.json()["query"]["published_since_ms"] == epoch_ms(since)
    response = http.get(FOR_USER.format(FIRST_USER + row), params={"published_since": "soon"})
    assert response.status_code == 422
    assert "published_since" in response.text


def test_unknown_ids_are_404(http):
    response = http.get(SIMILAR.format(999_999))
    assert response.status_code == 404
    assert "project 999999" in response.json()["detail"]
    assert http.get(FOR_USER.format(999_999)).status_code == 404


@pytest.mark.parametrize("query", ["k=0", "k=101", "k=x", "exclude_owner=maybe"])
def test_bad_parameters_are_422(http, query):
    assert http.get(f"{SIMILAR.format(FIRST_PROJECT)}?{query}").status_code == 422


def test_bad_ids_are_422(http):
    assert http.get(SIMILAR.format(-1)).status_code == 422
    assert http.get(FOR_USER.format(2**64)).status_code == 422


def test_uploads_are_bounded_and_checked(http):
    # 4 KiB allowed: over it -> 413 from the route; far over it -> 413 before parsing.
    for size in (5000, 200_000):
        response = http.post("/v1/similar", files={"image": ("a.png", b"x" * size)})
        assert response.status_code == 413, response.text
    response = http.post("/v1/similar", files={"image": ("a.png", b"not an image")})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("not an image")
    assert http.post("/v1/similar").status_code == 422  # no file at all


def test_image_upload_works_with_the_loaded_model(http):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, "PNG")
    response = http.post("/v1/similar", files={"image": ("a.png", buffer.getvalue())},
                         params={"k": 3})
    assert len(ids(response)) == 3
    assert response.json()["query"]["cnn_version"] == 1


def test_no_model_is_503(world):
    with serving(world.settings, live=False) as http:
        response = http.post("/v1/similar", files={"image": ("a.png", b"x")})
        assert response.status_code == 503
        assert "no CNN model is live" in response.json()["detail"]


def test_bearer_token(world, monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    settings = world.settings.model_copy(update={"api_token": SecretStr("s3cret-token")})
    url = SIMILAR.format(FIRST_PROJECT)
    with serving(settings) as http:
        assert http.get(url).status_code == 401
        wrong = http.get(url, headers={"Authorization": "Bearer s3cret"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert http.get(url, headers={"Authorization": "Basic s3cret-token"}).status_code == 401
        assert http.get(url, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert http.post("/v1/similar", files={"image": ("a", b"x")}).status_code == 401
        for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert http.get(open_path).status_code == 200, open_path
    assert len(calls) >= 3


def test_openapi_lists_the_routes(http):
    spec = http.get("/openapi.json").json()
    assert {"/v1/projects/{project_id}/similar", "/v1/similar",
            "/v1/users/{user_id}/recommendations", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_health_and_readiness(world, http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["cnn_version"] == 1
    missing = world.settings.model_copy(update={"milvus_prefix": "tmissing_"})
    with serving(missing) as other:
        response = other.get("/readyz")
        assert response.status_code == 503
        assert "alias tmissing_cofeat_projects does not exist" in response.json()["problems"]
        assert other.get(SIMILAR.format(FIRST_PROJECT)).status_code == 503
    with serving(world.settings, live=False) as other:
        assert other.get("/readyz").status_code == 503


def test_readiness_follows_milvus(world):
    # Milvus behind a private TCP proxy, cut and restored: the real server, a real outage.
    proxy = Proxy(int(world.settings.milvus_uri.rsplit(":", 1)[1]))
    via_proxy = world.settings.model_copy(
        update={"milvus_uri": f"http://127.0.0.1:{proxy.port}", "milvus_timeout_s": 2.0})
    try:
        with serving(via_proxy) as other:
            assert other.get("/readyz").status_code == 200
            proxy.cut()
            response = other.get("/readyz")
            assert response.status_code == 503
            assert any(p.startswith("Milvus does not answer")
                       for p in response.json()["problems"]), response.text
            assert other.get("/healthz").status_code == 200  # alive: no restart helps
            assert other.get(SIMILAR.format(FIRST_PROJECT)).status_code == 503
            proxy.restore()
            wait_until(lambda: other.get("/readyz").status_code == 200, 60,
                       "/readyz to recover with Milvus")
            assert ids(other.get(SIMILAR.format(FIRST_PROJECT), params={"k": 3})) == \
                world.nearest(world.projects[0])[1:4]
    finally:
        proxy.close()


def test_serve_starts_while_milvus_is_down(world):
    proxy = Proxy(int(world.settings.milvus_uri.rsplit(":", 1)[1]))
    proxy.cut()
    via_proxy = world.settings.model_copy(
        update={"milvus_uri": f"http://127.0.0.1:{proxy.port}", "milvus_timeout_s": 2.0})
    app = create_app(via_proxy, watch=False)  # its own client: connected on first use
    app.state.models.live = LiveModel(1, tiny_model())
    try:
        with TestClient(app) as http:
            assert http.get("/healthz").status_code == 200
            response = http.get("/readyz")
            assert response.status_code == 503
            assert any(p.startswith("Milvus does not answer")
                       for p in response.json()["problems"]), response.text
            assert http.get(SIMILAR.format(FIRST_PROJECT)).status_code == 503
            proxy.restore()
            wait_until(lambda: http.get("/readyz").status_code == 200, 60,
                       "/readyz once Milvus answers")
            assert ids(http.get(SIMILAR.format(FIRST_PROJECT), params={"k": 3})) == \
                world.nearest(world.projects[0])[1:4]
    finally:
        proxy.close()


def test_metrics(http):
    http.get(SIMILAR.format(FIRST_PROJECT))
    http.get(SIMILAR.format(999_999))
    text = http.get("/metrics").text
    route = 'route="/v1/projects/{project_id}/similar"'
    assert f'cofeat_serve_requests_total{{{route},status="200"}}' in text
    assert f'cofeat_serve_requests_total{{{route},status="404"}}' in text
    assert f"cofeat_serve_request_seconds_bucket{{le=\"0.01\",{route}}}" in text


# -- command line -----------------------------------------------------------------------


def env_of(settings) -> dict:
    return {"COFEAT_MILVUS_URI": settings.milvus_uri, "COFEAT_MILVUS_PREFIX":
            settings.milvus_prefix, "COFEAT_DATA_DIR": str(settings.data_dir),
            "COFEAT_LOG_FORMAT": "text"}


def test_search_cli(world):
    runner, env = CliRunner(), env_of(world.settings)
    result = runner.invoke(cli, ["search", "similar", "--project-id", str(FIRST_PROJECT + 9),
                                 "--k", "4", "--exclude-owner"], env=env)
    assert result.exit_code == 0, result.output
    keep = world.owners != world.owners[9]
    payload = json.loads(result.stdout)
    assert [hit["project_id"] for hit in payload["results"]] == \
        world.nearest(world.projects[9], keep)[:4]
    result = runner.invoke(cli, ["search", "for-user", "--user-id", str(FIRST_USER + 1),
                                 "--new-only"], env=env)
    assert result.exit_code == 0, result.output
    assert [hit["project_id"] for hit in json.loads(result.stdout)["results"]] == \
        world.nearest(world.users[1], np.arange(300) < 168)[:20]
    since = (datetime.now(UTC) - timedelta(hours=10)).replace(microsecond=0, tzinfo=None)
    result = runner.invoke(cli, ["search", "for-user", "--user-id", str(FIRST_USER + 1),
                                 "--published-since", since.isoformat(), "--k", "50"], env=env)
    assert result.exit_code == 0, result.output
    keep = world.published >= epoch_ms(since)
    assert [hit["project_id"] for hit in json.loads(result.stdout)["results"]] == \
        world.nearest(world.users[1], keep)


def test_search_cli_errors(world):
    runner, env = CliRunner(), env_of(world.settings)
    result = runner.invoke(cli, ["search", "similar", "--project-id", "999999"], env=env)
    assert result.exit_code == 1
    assert "project 999999 has no vector" in result.stderr
    result = runner.invoke(cli, ["search", "for-user", "--user-id", "999999"], env=env)
    assert result.exit_code == 1
    result = runner.invoke(cli, ["search", "similar"], env=env)
    assert result.exit_code == 2
    assert "exactly one of --project-id and --image" in result.stderr
    result = runner.invoke(cli, ["search", "for-user", "--user-id", "1", "--published-since",
                                 "last week"], env=env)
    assert result.exit_code == 2
    assert "--published-since" in result.stderr


# -- a real process ---------------------------------------------------------------------


def test_cofeat_serve_process(world):
    port = free_port()
    env = {**os.environ, **env_of(world.settings), "COFEAT_SERVE_PORT": str(port),
           "COFEAT_API_TOKEN": "tok"}
    env.pop("COFEAT_DATABASE_URL", None)
    cofeat = Path(sys.executable).with_name("cofeat")
    proc = subprocess.Popen([str(cofeat), "serve", "--host", "127.0.0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, timeout=60)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        response = httpx.get(base + SIMILAR.format(FIRST_PROJECT), params={"k": 3},
                             headers={"Authorization": "Bearer tok"})
        assert ids(response) == world.nearest(world.projects[0])[1:4]
        assert "cofeat_serve_requests_total" in httpx.get(f"{base}/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    # uvicorn shuts down cleanly, then re-raises the signal so the exit status tells it.
    assert proc.returncode in (0, -signal.SIGTERM), stderr.decode()[-2000:]
    assert "Application shutdown complete" in stderr.decode()
