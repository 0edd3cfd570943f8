"""The one refresh loop: `cofeat refresh --loop` every COFEAT_REFRESH_EVERY, as a real
process against a real (empty) store, writing the heartbeat the container probe reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.refresh.cli import app
from services.refresh.heartbeat import heartbeat_path
from shared import settings as settings_module
from shared.settings import SettingsError, load_settings
from tests.helpers import cofeat, settings_env, start, wait_until

PROBE = Path(__file__).resolve().parents[3] / "deploy" / "healthcheck.py"


def probe_heartbeat(data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), "--heartbeat"], capture_output=True,
                          text=True, env={"COFEAT_DATA_DIR": str(data_dir)}, timeout=30)


@pytest.mark.parametrize("args,every", [(["--loop"], "2s"), (["--every", "3s"], "1h")],
                         ids=["setting", "override"])
def test_loop_writes_the_heartbeat_the_probe_reads(settings, tmp_path, args, every):
    assert probe_heartbeat(settings.data_dir).returncode == 1  # no cycle yet
    env = settings_env(settings, COFEAT_REFRESH_EVERY=every)
    proc = start(cofeat("refresh", *args), env, tmp_path / "refresh.log")
    try:
        # An empty store: both steps skip, which is a finished cycle all the same.
        wait_until(lambda: heartbeat_path(settings.data_dir).exists(), 120,
                   "the first refresh cycle")
        record = json.loads(heartbeat_path(settings.data_dir).read_text())
        assert record["interval_s"] == (2.0 if every == "2s" else 3.0)
        first = record["finished_at"]
        wait_until(lambda: json.loads(heartbeat_path(settings.data_dir).read_text())
                   ["finished_at"] > first, 60, "the second cycle")
        result = probe_heartbeat(settings.data_dir)
        assert result.returncode == 0, result.stderr
    finally:
        proc.terminate()
        proc.wait(30)
    log = (tmp_path / "refresh.log").read_text()
    assert "factors: skipped" in log and "cnn: skipped" in log, log[-2000:]


@pytest.mark.parametrize("args", [[], ["--once", "--loop"], ["--once", "--every", "1m"],
                                  ["factors"], ["cnn", "--loop", "--once"]])
def test_exactly_one_mode(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == (0 if not args else 2), result.output


@pytest.mark.parametrize("value", ["0", "0s", "10 minutes", "-5m", ""])
def test_a_bad_interval_is_a_one_line_settings_error(monkeypatch, value):
    monkeypatch.setenv("COFEAT_REFRESH_EVERY", value)
    result = CliRunner().invoke(app, ["--loop"])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("cofeat: invalid setting COFEAT_REFRESH_EVERY")


@pytest.mark.parametrize("old,value,seconds", [("COFEAT_RUN_REFRESH_EVERY", "5m", 300),
                                               ("COFEAT_REFRESH_INTERVAL_S", "3600", 3600)])
def test_old_interval_names_still_work_with_a_warning(monkeypatch, capsys, old, value,
                                                      seconds):
    monkeypatch.setattr(settings_module, "_warned", set())
    monkeypatch.delenv("COFEAT_REFRESH_EVERY", raising=False)
    monkeypatch.setenv(old, value)
    loaded = load_settings()
    assert settings_module.interval_seconds(loaded.refresh_every) == seconds
    load_settings()  # warned once per process, not per load
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"cofeat: warning: {old} is deprecated")
    assert "COFEAT_REFRESH_EVERY" in warning


def test_old_and_new_interval_names_together_are_an_error(monkeypatch):
    monkeypatch.setenv("COFEAT_REFRESH_INTERVAL_S", "3600")
    monkeypatch.setenv("COFEAT_REFRESH_EVERY", "1h")
    with pytest.raises(SettingsError, match="set only COFEAT_REFRESH_EVERY"):
        load_settings()
    monkeypatch.delenv("COFEAT_REFRESH_EVERY")
    monkeypatch.setenv("COFEAT_RUN_REFRESH_EVERY", "10m")
    with pytest.raises(SettingsError, match="set only COFEAT_REFRESH_EVERY"):
        load_settings()
