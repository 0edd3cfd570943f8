"""Drift between Milvus and Postgres: found by `cofeat embed --verify`, fixed by `--repair`,
and found and fixed by the running embedder on its own."""

from __future__ import annotations

import json

import pytest

from services.embedder import metrics
from services.embedder.service import Embedder
from shared import milvus as contract
from shared.events import ProjectEvent
from shared.kafka.admin import ensure_topics
from tests.helpers import cofeat, start
from tests.services.embedder.conftest import (
    NOW_MS,
    Platform,
    alias_target,
    client,
    env,
    held,
    live_ids,
    make_cnn,
    make_image,
    settle,
)


@pytest.fixture
def served(esettings, db_url):
    """Five stored projects, served by a settled embedder; yields (embedder, collection)."""
    ensure_topics(esettings)
    images = esettings.data_dir / "images"
    images.mkdir(exist_ok=True)
    platform = Platform(esettings, db_url)
    platform.send(*(ProjectEvent(f"p{pid}", "published", pid, 7,
                                 make_image(images / f"{pid}.png", pid), NOW_MS() - 60_000)
                    for pid in range(1, 6)))
    platform.ingest()
    make_cnn(esettings, db_url, seed=1)
    embedder = Embedder(esettings)
    embedder.start()
    settle(embedder, platform)
    c = client(esettings)
    yield embedder, alias_target(c, esettings, contract.PROJECTS)
    c.close()
    embedder.close()
    platform.close()


def drift_in(settings, name: str) -> None:
    """1 missing, 99 extra, 2 at a state Postgres no longer holds."""
    c = client(settings)
    try:
        row = c.query(name, filter="project_id == 2", output_fields=["*"],
                      consistency_level="Strong")[0]
        c.delete(name, ids=[1])
        c.upsert(name, [row | {"state_version": row["state_version"] + 100},
                        row | {"project_id": 99}])
    finally:
        c.close()


def check(settings, tmp_path, *args: str) -> tuple[int, dict]:
    log = tmp_path / f"check{len(list(tmp_path.glob('check*')))}.log"
    proc = start(cofeat("embed", *args), env(settings), log)
    code = proc.wait(120)
    return code, json.loads(log.read_text().strip().splitlines()[-1])


def test_verify_reports_drift_and_repair_fixes_it(esettings, db_url, tmp_path, served):
    embedder, name = served
    code, report = check(esettings, tmp_path, "--verify")
    assert code == 0 and report["drift"] == 0 and report["collection"] == name
    drift_in(esettings, name)
    code, report = check(esettings, tmp_path, "--verify")
    assert code == 1
    assert (report["missing"], report["extra"], report["stale"]) == (1, 1, 1)
    assert report["sample"] == {"missing": [1], "extra": [99], "stale": [2]}
    embedder.close()  # --repair writes as the leader would: no embedder beside it
    code, report = check(esettings, tmp_path, "--repair")
    assert code == 0 and report["repaired"] and report["drift"] == 3
    c = client(esettings)
    assert held(c, name) == live_ids(db_url)
    c.close()
    assert check(esettings, tmp_path, "--verify")[0] == 0


def test_the_running_embedder_finds_and_repairs_drift(esettings, db_url, served):
    embedder, name = served
    embedder.settings = esettings.model_copy(update={"embed_reconcile_every_s": 0.5})
    embedder.reconciler.settings = embedder.settings
    repaired = metrics.DRIFT_REPAIRED._value.get()
    drift_in(esettings, name)
    embedder.reconciler.next_at = 0.0
    settle(embedder, timeout_s=60,
           until=lambda: metrics.DRIFT_REPAIRED._value.get() >= repaired + 3)
    assert metrics.DRIFT.labels("missing")._value.get() == 1
    assert metrics.DRIFT.labels("extra")._value.get() == 1
    assert metrics.DRIFT.labels("stale")._value.get() == 1
    c = client(esettings)
    assert held(c, name) == live_ids(db_url)
    c.close()
    # The next round finds nothing.
    embedder.reconciler.next_at = 0.0
    settle(embedder, timeout_s=60, until=lambda: embedder.reconciler.scan is None
           and embedder.reconciler.next_at > 0.0)
    assert metrics.DRIFT.labels("missing")._value.get() == 0


def test_a_change_the_stream_has_not_reached_yet_is_not_drift(esettings, db_url, served):
    """A project ingest stored whose event the stream has not polled yet looks missing to
    the scan. The check confirms only once the stream has written every event the broker
    held when the scan ended, however long that takes: no drift is counted, and the
    stream, not a repair, writes the project."""
    import time

    embedder, name = served
    embedder.settings = esettings.model_copy(update={"embed_reconcile_every_s": 0.5})
    embedder.reconciler.settings = embedder.settings
    repaired = metrics.DRIFT_REPAIRED._value.get()
    images = esettings.data_dir / "images"
    platform = Platform(esettings, db_url)
    try:
        platform.send(ProjectEvent("p6", "published", 6, 7, make_image(images / "6.png", 6),
                                   NOW_MS() - 1000))
        platform.ingest()
    finally:
        platform.close()
    reconciler = embedder.reconciler
    reconciler.next_at = 0.0
    while reconciler.scan is None or not reconciler.scan.done:
        reconciler.step()  # the stream does not run meanwhile: it lags behind
    assert reconciler.scan.suspects.missing == [6]
    waited = time.monotonic() + 3.0  # longer than any fixed grace the check might give
    while time.monotonic() < waited:
        reconciler.step()
    assert reconciler.scan is not None, "confirmed before the stream wrote what it read"
    settle(embedder, timeout_s=60, until=lambda: reconciler.scan is None)
    assert metrics.DRIFT.labels("missing")._value.get() == 0
    assert metrics.DRIFT_REPAIRED._value.get() == repaired
    c = client(esettings)
    assert held(c, name) == live_ids(db_url) and 6 in held(c, name)
    c.close()
