from typer.testing import CliRunner

from services.cli import app
from shared import groundtruth
from shared.topics import INTERACTIONS, PROJECTS


def test_files_images_and_truth(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["simulate", "--preset", "tiny", "--projects", "120", "--events", "2000",
              "--image-size", "64", "--format", "jpeg", "--processes", "2", "--out", str(out)],
        env={"COFEAT_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "images").rglob("*.jpg"))) == 120
    lines = (out / f"{INTERACTIONS}.jsonl").read_text().splitlines()
    assert 1900 < len(lines) < 2100
    assert len((out / f"{PROJECTS}.jsonl").read_text().splitlines()) >= 120
    truth = groundtruth.read(tmp_path)
    assert len(truth.project_ids) == 120 and truth.meta["events"] == 2000


def test_image_base_url_publishes_http_uris_for_the_rendered_files(tmp_path):
    """The CDN's view of COFEAT_DATA_DIR/images: each URI names the file under that URL,
    and served from there, the embedder's reader reads it."""
    import json

    from shared.images import ImageReader
    from shared.settings import Settings
    from tests.conftest import free_port
    from tests.imageserver import ImageServer

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["simulate", "--preset", "tiny", "--projects", "30", "--events", "300",
              "--image-size", "32", "--processes", "1", "--out", str(out),
              "--image-base-url", "http://127.0.0.1:1/imgs/"],
        env={"COFEAT_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    uris = {json.loads(line)["image_uri"]
            for line in (out / f"{PROJECTS}.jsonl").read_text().splitlines()}
    assert len(uris) == 30
    for uri in uris:
        assert uri.startswith("http://127.0.0.1:1/imgs/0000/") and uri.endswith(".png")
        assert (tmp_path / "images" / uri.removeprefix("http://127.0.0.1:1/imgs/")).is_file()

    server = ImageServer(free_port(), tmp_path / "images" / "0000")
    try:
        reader = ImageReader.from_settings(Settings(data_dir=tmp_path, image_hosts="127.0.0.1",
                                                    image_cache_bytes=0))
        uri = sorted(uris)[0].replace("http://127.0.0.1:1/imgs/0000", f"{server.base}/files")
        assert reader.open(uri).size == (32, 32)
    finally:
        server.close()
    bad = CliRunner().invoke(app, ["simulate", "--preset", "tiny", "--stats",
                                   "--image-base-url", "ftp://x/"],
                             env={"COFEAT_DATA_DIR": str(tmp_path)})
    assert bad.exit_code == 2


def test_stats_prints_the_realism_check(tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--preset", "tiny", "--stats"],
                                env={"COFEAT_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    for needle in ("density appreciations", "density views", "filtered", "per user",
                   "per project", "style preferred", "category preferred", "lift",
                   "colour statistics -> style", "style from structure"):
        assert needle in result.output
    assert not (tmp_path / "groundtruth").exists()  # --stats writes nothing


def test_unknown_preset_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--preset", "huge", "--stats"],
                                env={"COFEAT_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2
