"""`cofeat refresh cnn` on the simulator's tiny world through the real store."""

from __future__ import annotations

import json

import psycopg
import pytest

from services.refresh.cnn import versions
from services.refresh.cnn.service import run_cnn_once
from services.refresh.factors.service import run_factors_once
from shared.cnn import current_cnn_version
from shared.settings import Settings
from tests.world import load

FAST = dict(
    als_factors=16, als_iterations=8, filter_min_user_count=2, filter_min_item_count=2,
    filter_top_user_pct=0.5, filter_top_item_pct=0.5, eval_fraction=0.3,
    cnn_backbone="small", cnn_image_size=32, cnn_epochs=3, cnn_refresh_epochs=1,
    cnn_batch_size=64, cnn_workers=0, cnn_min_projects=20, log_format="text",
    refresh_promote_margin=1.0)  # factor promotion is not what these tests are about


@pytest.fixture
def world_settings(db_url, tiny_world, tmp_path):
    roots = f"{tiny_world / 'images'},{tmp_path / 'images'}"  # the world's, and test copies

    def make(**overrides) -> Settings:
        return Settings(database_url=db_url, data_dir=tmp_path / "data", image_roots=roots,
                        **{**FAST, **overrides})
    return make


def _row(db_url: str, version_id: int) -> dict:
    with psycopg.connect(db_url) as conn:
        cur = conn.execute("SELECT * FROM model_versions WHERE id = %s", (version_id,))
        names = [c.name for c in cur.description]
        return dict(zip(names, cur.fetchone(), strict=True))


def test_first_run_trains_and_promotes_then_skips(world_settings, db_url, tiny_world):
    settings = world_settings()
    load(db_url, tiny_world / "events", stop=0.7)
    assert run_cnn_once(settings).status == "skipped"  # no factor version yet
    assert run_factors_once(settings, full=True).status == "promoted"

    result = run_cnn_once(settings, show_progress=False)
    assert (result.status, result.mode) == ("promoted", "full")
    row = _row(db_url, result.version_id)
    assert row["kind"] == "cnn" and row["factor_version_id"] is not None
    assert row["stats"]["train"] > 100 and row["stats"]["val"] > 5
    meta = json.loads((settings.data_dir / row["artifact"] / "meta.json").read_text())
    losses = [epoch["train_loss"] for epoch in meta["history"]]
    assert losses[-1] < losses[0], losses
    assert (settings.data_dir / row["artifact"] / "model.pt").exists()
    assert (settings.data_dir / row["artifact"] / "loss.png").exists()
    assert not (settings.data_dir / "checkpoints" / "cnn").exists() or not any(
        (settings.data_dir / "checkpoints" / "cnn").iterdir())

    again = run_cnn_once(settings)
    assert again.status == "skipped" and "already learned" in again.reason


def test_refresh_fine_tunes_from_the_parent(world_settings, db_url, tiny_world):
    settings = world_settings()
    load(db_url, tiny_world / "events", stop=0.6)
    run_factors_once(settings, full=True)
    first = run_cnn_once(settings)
    load(db_url, tiny_world / "events", start=0.6, stop=0.8)
    assert run_factors_once(settings).status == "promoted"

    second = run_cnn_once(settings)
    assert second.mode == "fine-tune"
    row = _row(db_url, second.version_id)
    assert row["parent_id"] == first.version_id
    assert row["params"]["refresh"] == "fine-tune"
    assert 0 < row["stats"]["changed_oversampled"] <= row["stats"]["train"]
    assert row["metrics"]["parent_val_score"] is not None


def test_a_model_worse_than_its_parent_is_not_promoted(world_settings, db_url, tiny_world):
    settings = world_settings(cnn_epochs=4)
    load(db_url, tiny_world / "events", stop=0.6)
    run_factors_once(settings, full=True)
    first = run_cnn_once(settings)
    load(db_url, tiny_world / "events", start=0.6, stop=0.8)
    run_factors_once(settings)
    # A learning rate this large wrecks the fine-tuned weights.
    wrecked = run_cnn_once(world_settings(cnn_lr=50.0, cnn_promote_margin=0.0))
    assert wrecked.status == "rejected", wrecked.metrics
    with psycopg.connect(db_url) as conn:
        assert current_cnn_version(conn)["id"] == first.version_id


def test_missing_and_corrupt_images_are_skipped_and_counted(world_settings, db_url,
                                                            tiny_world, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(tiny_world / "images", images)
    events = tmp_path / "events"
    events.mkdir()
    for name in ("cofeat.interactions.jsonl", "cofeat.projects.jsonl"):
        text = (tiny_world / "events" / name).read_text()
        (events / name).write_text(text.replace(str(tiny_world / "images"), str(images)))
    files = sorted(images.rglob("*.jpg"))
    files[0].unlink()
    files[1].write_bytes(b"not an image at all")
    files[2].write_bytes(files[2].read_bytes()[:40])  # truncated

    settings = world_settings()
    load(db_url, events)
    run_factors_once(settings, full=True)
    result = run_cnn_once(settings)
    assert result.status == "promoted"
    stats = _row(db_url, result.version_id)["stats"]
    # Missing, corrupt and truncated alike are skipped while training, and counted. The
    # three broken projects may or may not survive the popularity filter.
    assert 1 <= stats["skipped_images"] <= 3 and stats["image_refused"] == 0


def test_a_second_concurrent_run_does_not_train(world_settings, db_url):
    settings = world_settings()
    with psycopg.connect(db_url) as conn, versions.refresh_lock(conn) as got:
        assert got
        assert run_cnn_once(settings).status == "skipped"


def test_an_interrupted_run_on_other_inputs_does_not_block_the_next(world_settings, db_url,
                                                                    tiny_world):
    settings = world_settings()
    load(db_url, tiny_world / "events", stop=0.7)
    run_factors_once(settings, full=True)
    stale = settings.data_dir / "checkpoints" / "cnn" / "f1-p0-full-0123456789ab"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "checkpoints" / "epoch-0001.pt").write_bytes(b"from a run on other data")
    assert run_cnn_once(settings).status == "promoted"
    assert not stale.exists()
