"""`cofeat eval` end to end on a small simulated world (images, ground truth, events from the
real simulator; factor and CNN versions written here)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.evaluate import warmup
from services.evaluate.evaluate import (
    CATEGORY,
    CATEGORY_IN,
    CONTENT_PROBE,
    FACTORS,
    FEATURE_SOURCES,
    IMAGENET_INIT,
    POPULARITY,
    RANDOM,
    RECALL_SOURCES,
    REGRESS,
    REGRESS_IN,
    STYLE_MAP,
    TASKS,
    USER_RECALL,
)
from tests.services.evaluate import world

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir with images and ground truth, events dir); rendered once per module."""
    root = tmp_path_factory.mktemp("sim")
    world.simulate(root / "data", root / "events", "--preset", "tiny", "--projects", "1200",
                   "--users", "400", "--events", "40000", "--image-size", "48")
    return root / "data", root / "events"


@pytest.fixture
def stored(simulated, db_url, data_dir, monkeypatch) -> tuple[str, Path, int]:
    """The events in a fresh database, the ground truth in this test's data dir (image
    URIs are absolute, so the images stay where the simulator put them, and that is the
    root images may be read from)."""
    shutil.copytree(simulated[0] / "groundtruth", data_dir / "groundtruth")
    monkeypatch.setenv("COFEAT_IMAGE_ROOTS", str(simulated[0] / "images"))
    return db_url, data_dir, world.store_in_phases(db_url, simulated[1])


def run_eval(db_url: str, data_dir: Path, out: Path, *args: str):
    env = {"COFEAT_DATABASE_URL": db_url, "COFEAT_DATA_DIR": str(data_dir),
           "COFEAT_LOG_FORMAT": "text"}
    outcome = CliRunner().invoke(app, ["eval", "--out", str(out), "--workers", "0", *args],
                                 env=env)
    if outcome.exception is not None and outcome.exit_code == 1:
        import traceback
        traceback.print_exception(outcome.exception)
    assert outcome.exit_code == 0, outcome.output
    return outcome, json.loads((out / "eval.json").read_text())


def scores(report: dict) -> dict:
    return {(r["task"], r["features"]): r["score"] for r in report["results"]}


def test_eval_writes_the_table_with_a_live_cnn(stored, tmp_path):
    """ALS factors and a live regress CNN: eval takes its holdout and architecture, trains
    the other sources the same way, and reports every task x source."""
    import torch

    from shared.vision import ModelConfig, build_model

    db_url, data_dir, watermark = stored
    factor_id = world.fit_factor_version(db_url, data_dir, watermark, factors=16)
    torch.manual_seed(0)
    live = build_model(ModelConfig(backbone="small", out_dim=16, image_size=32))
    params = {"mode": "regress", "val_fraction": 0.2, "holdout_salt": 7, "epochs": 1}
    cnn_id = world.insert_cnn_version(db_url, data_dir, factor_id, live,
                                      {"params": params, "centroids": None})
    out = tmp_path / "out"
    outcome, report = run_eval(db_url, data_dir, out, "--max-projects", "150",
                               "--imagenet-size", "64", "--imagenet-init-epochs", "1")

    assert set(report) == {"world", "results"}
    info = report["world"]
    assert (info["factor_version"], info["cnn_version"]) == (factor_id, cnn_id)
    assert (info["val_fraction"], info["holdout_salt"], info["epochs"]) == (0.2, 7, 1)
    assert (info["image_size"], info["projects"], info["users"]) == (32, 1200, 400)
    expected = {(task, source) for task in TASKS if task != USER_RECALL
                for source in FEATURE_SOURCES}
    expected |= {(USER_RECALL, source) for source in RECALL_SOURCES}
    curve = [r for r in report["results"] if "seen" in r]
    got = [(r["task"], r["features"]) for r in report["results"] if "seen" not in r]
    assert sorted(got) == sorted(expected)
    # The warm-up curve: CNN and warm vectors at every N, popularity once anything is seen.
    assert curve and {r["task"] for r in curve} == {warmup.TASK}
    for seen in {r["seen"] for r in curve}:
        sources = {r["features"] for r in curve if r["seen"] == seen}
        want = {warmup.CNN, warmup.WARM} | ({warmup.POPULARITY} if seen else set())
        assert sources == want, (seen, sources)
    for row in report["results"]:
        assert 0.0 <= row["score"] <= 1.0, row
        assert row["n"] > 0
    table = (out / "eval.md").read_text()
    for name in (*TASKS, *FEATURE_SOURCES, POPULARITY):
        assert name in table and name in outcome.output
    assert (out / "neighbours.png").stat().st_size > 10_000
    # Per-source train and embed time; frozen ImageNet features train for nothing.
    assert info["imagenet_image_size"] == 64
    assert info["seconds"]["imagenet"]["train"] == 0 and info["seconds"]["imagenet"]["embed"] > 0
    assert info["seconds"]["collaborative-regress"]["embed"] > 0
    assert "| imagenet |" in table
    # The ImageNet-initialised twins train even beside a live CNN.
    assert info["imagenet_init"] == {"backbone": "mobilenet_v2", "epochs": 1, "image_size": 32}
    for source in IMAGENET_INIT:
        assert info["seconds"][source]["train"] > 0 and f"| {source} |" in table


def test_collaborative_learns_style_and_category_learns_content(stored, tmp_path):
    """Where style alone drives the factors, the CNN regressing them must beat random
    weights on style retrieval, and the category-trained CNN must beat them on content.
    A broken target/image pairing, feature layer or probe makes either margin vanish."""
    db_url, data_dir, watermark = stored
    world.style_factor_version(db_url, data_dir, watermark)
    _, report = run_eval(db_url, data_dir, tmp_path / "out", "--epochs", "8",
                         "--batch-size", "32", "--image-size", "48")
    got = scores(report)
    assert got[STYLE_MAP, REGRESS] > got[STYLE_MAP, RANDOM] + 0.1, got
    assert got[CONTENT_PROBE, CATEGORY] > got[CONTENT_PROBE, RANDOM] + 0.1, got
    # The same two, fine-tuned from ImageNet, learn the same things.
    assert got[STYLE_MAP, REGRESS_IN] > got[STYLE_MAP, RANDOM] + 0.1, got
    assert got[CONTENT_PROBE, CATEGORY_IN] > got[CONTENT_PROBE, RANDOM] + 0.1, got
    # The factors themselves know style perfectly up to noise: the upper bound.
    assert got[STYLE_MAP, FACTORS] > 0.9
    assert not any(math.isnan(v) for v in got.values())
