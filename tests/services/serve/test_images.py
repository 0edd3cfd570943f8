"""Image search end to end: a tiny random-init CNN saved as a promoted CNN version, a few
generated images embedded into the collection, then queried with one of those files."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text
from typer.testing import CliRunner

from services.cli import app as cli
from services.serve.app import create_app
from services.serve.live import ModelHolder
from shared import milvus
from shared.artifacts import version_dir, write_json
from shared.client import CofeatClient, NotFound
from shared.db.engine import make_engine
from shared.settings import Settings
from shared.vision import ModelConfig, build_model, embed_images, save_model
from tests.services.serve.world import drop_world, load_projects, load_users

CONFIG = ModelConfig(backbone="small", out_dim=16, image_size=32)
N_IMAGES = 12


def add_cnn_version(settings: Settings, seed: int) -> tuple[int, object]:
    """A promoted CNN version row plus its artifact directory; returns (id, model)."""
    engine = make_engine(settings)
    with engine.begin() as conn:
        version = conn.execute(text(
            "INSERT INTO model_versions (kind, status) VALUES ('cnn', 'promoted') RETURNING id"
        )).scalar_one()
        conn.execute(text("UPDATE model_versions SET artifact = :a WHERE id = :id"),
                     {"a": f"models/cnn/v{version}", "id": version})
    engine.dispose()
    torch.manual_seed(seed)
    model = build_model(CONFIG).eval()
    folder = version_dir(settings.data_dir, "cnn", version)
    save_model(folder / "model.pt", model)
    write_json(folder / "meta.json", {"version": version})
    return version, model


def make_images(folder, count: int) -> list:
    rng = np.random.default_rng(1)
    folder.mkdir()
    paths = []
    for i in range(count):
        # Each image: its own colours and blocky texture, at a size that needs resizing.
        blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        path = folder / f"p{i}.png"
        Image.fromarray(blocks).resize((48, 40), Image.Resampling.NEAREST).save(path)
        paths.append(path)
    return paths


def embed_into_milvus(settings: Settings, version: int, model, paths,
                      users: bool = True) -> None:
    vectors = embed_images(model, paths)
    ids = np.arange(len(paths))
    load_projects(settings, version, ids, vectors, ids % 3, np.full(len(paths), 1_000))
    if users:  # /readyz wants both aliases
        load_users(settings, version, ids[:1], vectors[:1])


@pytest.fixture
def settings(db_url, milvus_uri, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = Settings(database_url=db_url, milvus_uri=milvus_uri, data_dir=data_dir,
                        milvus_prefix=f"t{uuid.uuid4().hex[:8]}_", log_format="text")
    yield settings
    drop_world(settings)


def env_of(settings: Settings) -> dict:
    return {"COFEAT_MILVUS_URI": settings.milvus_uri, "COFEAT_MILVUS_PREFIX":
            settings.milvus_prefix, "COFEAT_DATA_DIR": str(settings.data_dir),
            "COFEAT_DATABASE_URL": settings.database_url.get_secret_value()}


def test_image_search_finds_the_same_project_first(settings, tmp_path):
    version, model = add_cnn_version(settings, seed=0)
    paths = make_images(tmp_path / "images", N_IMAGES)
    embed_into_milvus(settings, version, model, paths)

    with TestClient(create_app(settings, watch=False)) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["cnn_version"] == version
        for i in (3, 7):
            response = http.post("/v1/similar", params={"k": 5},
                                 files={"image": (paths[i].name, paths[i].read_bytes())})
            assert response.status_code == 200, response.text
            first = response.json()["results"][0]
            assert first["project_id"] == i
            assert first["score"] == pytest.approx(1.0, abs=1e-4)
        assert http.post("/v1/similar", files={"image": ("x.png", b"GIF89a broken")}
                         ).status_code == 400

    result = CliRunner().invoke(cli, ["search", "similar", "--image", str(paths[5]), "--k", "3"],
                                env=env_of(settings))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["query"]["cnn_version"] == version
    assert payload["results"][0]["project_id"] == 5


def test_bomb_uploads_are_refused_in_little_memory(settings, tmp_path):
    """Issue 14: a 168 KB PNG upload took `cofeat serve` from 0.8 to 3.3 GiB."""
    from tests.bombs import jpeg_bomb, peak_rss_growth, png_bomb

    add_cnn_version(settings, seed=0)
    bombs = [png_bomb(tmp_path / "bomb.png"), jpeg_bomb(tmp_path / "bomb.jpg")]
    with TestClient(create_app(settings, watch=False)) as http:
        for bomb in bombs:
            answers = []

            def upload(bomb=bomb, answers=answers):
                answers.append(http.post("/v1/similar",
                                         files={"image": (bomb.name, bomb.read_bytes())}))

            grown = peak_rss_growth(upload)
            assert answers[0].status_code == 400, answers[0].text
            assert "too many pixels" in answers[0].json()["detail"]
            assert grown < 100 * 1024 * 1024, grown


def test_model_follows_the_alias(settings, tmp_path):
    first, model = add_cnn_version(settings, seed=0)
    paths = make_images(tmp_path / "images", 4)
    embed_into_milvus(settings, first, model, paths)
    client = CofeatClient.from_settings(settings)
    models = ModelHolder(settings, client)
    assert models.refresh().version == first

    # A newer model is promoted, but the vectors behind the alias are still the old one's.
    second, model = add_cnn_version(settings, seed=1)
    old = models.refresh()
    assert old.version == first
    # The embedder finishes the new collection and moves the alias: swap to the new model.
    embed_into_milvus(settings, second, model, paths, users=False)
    assert client.collection_version() == second
    # A request that meets the new version's vectors catches up at once, before the
    # periodic check (a TestClient outside `with` runs no start-up refresh).
    http = TestClient(create_app(settings, client, models, watch=False))
    response = http.post("/v1/similar", files={"image": ("p.png", paths[2].read_bytes())})
    assert response.status_code == 200, response.text
    assert response.json()["query"]["cnn_version"] == second
    assert response.json()["results"][0]["project_id"] == 2
    assert models.live.version == second
    assert http.get("/metrics").text.count(
        f'cofeat_model_version{{kind="cnn",service="serve"}} {float(second)}') == 1
    assert old.version == first  # a request holding the old reference keeps a whole model
    # The users alias still names the first version: no scores across two vector spaces.
    with pytest.raises(NotFound, match="model version"):
        client.for_user(0)
    assert http.get("/readyz").json()["ready"]

    # Without the alias, the newest promoted model is the best guess.
    milvus.connect(settings).drop_alias(milvus.alias(settings, milvus.PROJECTS))
    models.live = None
    assert models.refresh().version == second
    models.close()
    client.close()


def test_cli_says_when_no_model_is_live(settings, tmp_path):
    image = make_images(tmp_path / "images", 1)[0]
    result = CliRunner().invoke(cli, ["search", "similar", "--image", str(image)],
                                env=env_of(settings))
    assert result.exit_code == 1
    assert "no CNN model is live" in result.stderr
