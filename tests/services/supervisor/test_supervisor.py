"""`cofeat run` restarts a killed service and stops cleanly; `cofeat status` reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from services.supervisor.children import embed_threads, plan
from shared.settings import Settings
from tests.helpers import cofeat, interaction, settings_env, start, stored, wait_until


def _state(settings) -> dict:
    path = settings.data_dir / "run" / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _child(settings) -> dict:
    children = _state(settings).get("children", [])
    return children[0] if children else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_restarts_a_killed_service_and_stops_cleanly(settings, producer, db_url, tmp_path):
    producer.interactions_(interaction(n) for n in range(500))
    producer.flush()
    env = settings_env(settings, COFEAT_RUN_SERVICES="ingest")
    proc = start(cofeat("run"), env, tmp_path / "run.log")
    try:
        wait_until(lambda: _child(settings).get("running"), 30, "the ingest child")
        first_pid = _child(settings)["pid"]
        wait_until(lambda: stored(db_url) >= 500, 60, "events stored by the child")
        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: _child(settings).get("restarts") == 1
                   and _child(settings).get("running"), 30, "the restart")
        assert _child(settings)["pid"] != first_pid
        assert _child(settings)["last_exit"] == -signal.SIGKILL

        producer.interactions_(interaction(n) for n in range(500, 800))
        producer.flush()
        wait_until(lambda: stored(db_url) >= 800, 60, "events stored after the restart")

        status = subprocess.run(cofeat("status", "--json"), env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["supervisor"]["children"][0]["restarts"] == 1
        lags = [row["lag"] for row in report["lag"] if row["group"] == settings.ingest_group]
        assert lags and all(lag == 0 for lag in lags), report["lag"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    assert not _alive(_child(settings)["pid"] or 0) or _child(settings)["pid"] is None
    assert _state(settings)["stopped"] is True
    assert stored(db_url) == 800


def test_plan_gives_each_child_its_own_metrics_port(tmp_path):
    children = plan(["ingest", "embed"], 2, tmp_path, metrics_port=9100)
    assert [c.name for c in children] == ["ingest-0", "ingest-1", "embed"]
    assert [c.env["COFEAT_METRICS_PORT"] for c in children] == ["9101", "9102", "9103"]
    refresh = plan(["refresh"], 1, tmp_path)[0]
    assert refresh.argv == ["refresh", "--loop"]
    assert refresh.env["COFEAT_METRICS_PORT"] == "0"


def test_embedder_beside_training_gets_half_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.delenv("COFEAT_EMBED_TORCH_THREADS", raising=False)
    assert embed_threads(["ingest", "refresh", "embed"], Settings()) == 2
    assert embed_threads(["ingest", "embed"], Settings()) == 0  # alone: torch's default
    assert embed_threads(["refresh", "embed"], Settings(embed_torch_threads=3)) == 0  # given
    embed = plan(["refresh", "embed"], 1, tmp_path, embed_threads=2)[1]
    assert embed.env["COFEAT_EMBED_TORCH_THREADS"] == "2"
    assert "COFEAT_EMBED_TORCH_THREADS" not in plan(["embed"], 1, tmp_path)[0].env


def test_unknown_service_is_a_one_line_error(settings):
    result = subprocess.run(cofeat("run", "--services", "ingest,nope"),
                            env=settings_env(settings), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "unknown services ['nope']" in result.stderr
    time.sleep(0)
