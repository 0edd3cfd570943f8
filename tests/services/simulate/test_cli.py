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


def test_stats_prints_the_realism_check(tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--preset", "tiny", "--stats"],
                                env={"COFEAT_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    for needle in ("density appreciations", "density views", "filtered", "per user",
                   "per project", "style preferred", "category preferred", "lift",
                   "colour-statistics"):
        assert needle in result.output
    assert not (tmp_path / "groundtruth").exists()  # --stats writes nothing


def test_unknown_preset_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--preset", "huge", "--stats"],
                                env={"COFEAT_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2
