"""`make demo SCALE=tiny`: the whole loop, ending in a non-trivial table and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from shared.milvus import drop_prefixed
from tests.helpers import settings_env


@pytest.fixture
def milvus_prefix(milvus_uri):
    from pymilvus import MilvusClient

    prefix = f"demo{uuid.uuid4().hex[:8]}_"
    yield prefix
    client = MilvusClient(uri=milvus_uri)
    drop_prefixed(client, prefix)
    client.close()


def test_tiny_demo_writes_the_table_and_report(settings, milvus_uri, milvus_prefix, tmp_path):
    env = settings_env(settings, COFEAT_MILVUS_URI=milvus_uri, COFEAT_MILVUS_PREFIX=milvus_prefix,
                       COFEAT_LOG_FORMAT="json")
    result = subprocess.run([sys.executable, "-m", "services", "demo", "--scale", "tiny"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = settings.data_dir / "report"
    assert "| style_map@10 |" in result.stdout

    results = json.loads((report / "eval.json").read_text())["results"]
    features = {r["features"] for r in results}
    assert {"collaborative-regress", "category-supervised", "handcrafted", "imagenet",
            "collaborative (ImageNet init)", "category-supervised (ImageNet init)"} <= features
    style = {r["features"]: r["score"] for r in results if r["task"] == "style_map@10"}
    assert all(0 <= score <= 1 for score in style.values())
    assert style["collaborative-regress"] > 0.1, style  # chance is 1/24

    page = (report / "index.html").read_text()
    assert "style_map@10" in page and "Model versions" in page
    assert (report / "neighbours.png").stat().st_size > 10_000
    assert list(report.glob("loss-v*.png"))
    state = json.loads((settings.data_dir / "demo" / "state.json").read_text())
    assert {"live", "caught_up", "eval"} <= set(state)
    assert all(state[step]["seconds"] > 0 for step in ("live", "caught_up", "eval"))
    assert "step durations" in page

    # Run again: every step is recorded, so it only rebuilds the report.
    again = subprocess.run([sys.executable, "-m", "services", "demo", "--scale", "tiny"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "live loop" not in again.stdout


def test_images_over_http_are_served_from_the_data_dir(tmp_path):
    """`make demo IMAGES=http`: the demo serves COFEAT_DATA_DIR/images on loopback, allows
    that one host for every reader, and the simulator publishes URLs under it."""
    import time

    from PIL import Image

    from services.demo.steps import Demo, stop
    from shared.images import ImageError, ImageReader
    from shared.settings import Settings
    from tests.conftest import free_port

    demo = Demo(tmp_path / "data", "tiny", images="http")
    (demo.data_dir / "images" / "0000").mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(demo.data_dir / "images" / "0000" / "1.jpg")
    port = free_port()
    server = demo.serve_images(port)
    try:
        reader = ImageReader.from_settings(Settings(
            data_dir=demo.data_dir, image_hosts=demo.env["COFEAT_IMAGE_HOSTS"],
            image_cache_bytes=0))
        url = demo.image_base_url(port) + "0000/1.jpg"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert reader.open(url).size == (20, 20)
                break
            except ImageError:
                assert time.monotonic() < deadline, "the image server did not answer"
                time.sleep(0.2)
    finally:
        stop(server, timeout_s=10)


def test_the_world_option_reaches_the_simulator_and_a_bad_one_is_refused(tmp_path):
    """`make demo WORLD=palette`: the palette world (style tied to colour) instead of the
    scale's own, for the evaluation's table on it."""
    from services.demo.run import simulate_args
    from services.demo.steps import Demo

    args = simulate_args(Demo(tmp_path / "data", "small", world="palette"))
    assert args[args.index("--world") + 1] == "palette"
    assert "--world" not in simulate_args(Demo(tmp_path / "data", "small"))
    result = subprocess.run([sys.executable, "-m", "services", "demo", "--world", "purple"],
                            capture_output=True, text=True,
                            env={**os.environ, "COFEAT_DATA_DIR": str(tmp_path / "no")},
                            timeout=60)
    assert result.returncode == 2 and "world must be structure or palette" in result.stderr
