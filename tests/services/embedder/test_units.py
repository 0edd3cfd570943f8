"""The embedder's plain functions, without servers."""

from __future__ import annotations

import numpy as np
import pytest

from services.embedder.backfill import Backfill, normalized_users, user_rows
from services.embedder.collections import version_of
from services.embedder.encode import Encoder
from services.embedder.reconcile import Drift, _diff
from services.embedder.states import LEAVE, State, wanted
from services.embedder.stream import Change, IngestGate, Stream, observe
from services.embedder.writer import Target, Written
from shared import milvus as contract
from shared.images import REFUSED
from shared.settings import Settings
from shared.vision import ModelConfig, build_model, save_model
from tests.services.embedder.conftest import make_corrupt, make_image


def state(pid: int, uri: str, version: int = 1, owner: int = 10, published: int = 100,
          live: bool = True, failure: str | None = None) -> State:
    return State(pid, live, owner, published, uri, version, failure)


def change(pid: int, offset: int, produced: int = 1_000, partition: int = 0) -> Change:
    return Change(pid, f"e{pid}-{offset}", "t.projects", partition, offset, produced)


def test_only_live_healthy_states_are_wanted():
    assert wanted(state(1, "/a.png")) == state(1, "/a.png")
    assert wanted(state(1, "/a.png", live=False)) is None
    assert wanted(state(1, "/a.png", failure="permanent")) is None  # broken: no row
    assert wanted(state(1, "/a.png", failure="transient")) is LEAVE  # until storage answers
    assert wanted(None) is None  # Postgres does not know it: no row


def test_diff_names_missing_extra_and_stale_ids():
    drift = Drift()
    expected = {1: 5, 2: 6, 3: 7}
    held = {1: (5, 9), 2: (4, 9), 3: (7, 8), 4: (1, 9)}  # 2: old state, 3: old model
    _diff(expected, held, 9, drift)
    _diff({10: 1}, {}, 9, drift)
    assert (drift.missing, sorted(drift.stale), drift.extra) == ([10], [2, 3], [4])
    assert len(drift) == 4 and drift.ids() == [2, 3, 4, 10]
    assert drift.seen == {2: 6, 3: 7, 4: None, 10: 1}


def test_stored_offsets_never_pass_a_change_waiting_for_ingest():
    stream = Stream.__new__(Stream)
    stream.gate = IngestGate(Settings())
    stream.read_to = {("t.projects", 0): 10, ("t.projects", 1): 7}
    stream.stored = {("t.projects", 1): 7}
    stream.gate.add([change(1, 4), change(2, 6), change(3, 2, partition=1)])
    assert stream._offsets() == {("t.projects", 0): 4, ("t.projects", 1): 2}
    stream.gate.waiting.clear()
    assert stream._offsets() == {("t.projects", 0): 10}


def test_user_rows_are_normalized_and_skip_zero_vectors():
    factors = np.array([[3, 4], [0, 0], [1, 0]], np.float32)
    rows = user_rows(*normalized_users(factors, np.array([7, 8, 9])), version=5)
    assert [r["user_id"] for r in rows] == [7, 9]
    assert np.allclose(rows[0]["embedding"], [0.6, 0.8])
    assert {r["model_version"] for r in rows} == {5}


def test_version_of_reads_only_our_names():
    settings = Settings(milvus_prefix="t1_")
    assert version_of(settings, "cofeat_projects", "t1_cofeat_projects_v12") == 12
    assert version_of(settings, "cofeat_projects", "t2_cofeat_projects_v12") is None
    assert version_of(settings, "cofeat_projects", "t1_cofeat_users_v12") is None
    assert version_of(settings, "cofeat_projects", "t1_cofeat_projects_v1x") is None
    rebuilt = contract.collection_name(settings, "cofeat_projects", 12, rebuild=2)
    assert rebuilt == "t1_cofeat_projects_v12_2" and version_of(
        settings, "cofeat_projects", rebuilt) == 12


def test_backfill_steps_take_what_fits_their_time_budget(encoder):
    settings = Settings(embed_backfill_chunk=512, embed_backfill_step_s=0.5, embed_batch_size=64)
    backfill = Backfill(settings, None, None, None, Target("c", encoder), projects=True,
                        users=False)
    assert backfill._chunk() == 64  # nothing measured yet: one batch
    backfill._pace(64, 0.5)  # 128 projects/s
    assert backfill._chunk() == 64
    backfill._pace(400, 0.5)  # the cores freed up: (128 + 800) / 2 = 464/s
    assert backfill._chunk() == 232
    backfill._pace(10_000, 1.0)
    assert backfill._chunk() == 512  # never more than COFEAT_EMBED_BACKFILL_CHUNK
    backfill.pace = 0.5  # training took the cores
    assert backfill._chunk() == 1


@pytest.fixture
def encoder(tmp_path) -> Encoder:
    model = build_model(ModelConfig(backbone="small", out_dim=8, image_size=64)).eval()
    save_model(tmp_path / "models/cnn/v3/model.pt", model)
    (tmp_path / "models/cnn/v3/meta.json").write_text('{"version": 3}')
    settings = Settings(data_dir=tmp_path, embed_device="cpu", embed_batch_size=2)
    return Encoder(settings, {"id": 3, "artifact": "models/cnn/v3"})


def test_encoder_keeps_good_rows_and_names_each_failure(encoder, tmp_path):
    images = tmp_path / "images"  # COFEAT_IMAGE_ROOTS' default: COFEAT_DATA_DIR/images
    good = make_image(images / "good.png", 1)
    (images / "rel.png").write_bytes((images / "good.png").read_bytes())
    outside = make_image(tmp_path / "outside.png", 1)
    items = [state(1, good), state(2, make_corrupt(images / "c.png")),
             state(3, str(images / "missing.png")),
             state(4, "http://example.com/x.png"),
             state(5, "images/rel.png", version=4, owner=11, published=200), state(6, f"file://{good}"),
             state(7, outside)]
    result = encoder.embed(items)
    assert [r["project_id"] for r in result.rows] == [1, 5, 6]
    reasons = {item.project_id: why for item, why in result.failed}
    assert set(reasons) == {2, 3, 4, 7}
    assert reasons[2].startswith("not an image") and reasons[3] == "not found"
    assert reasons[4] == reasons[7] == REFUSED  # no host allowed; a file outside the roots
    row = result.rows[1]
    assert (row["model_version"], row["owner_id"], row["published_at"]) == (3, 11, 200)
    assert row["state_version"] == 4
    assert np.isclose(np.linalg.norm(row["embedding"]), 1.0, atol=1e-5)
    assert np.allclose(result.rows[0]["embedding"], result.rows[2]["embedding"])


def test_attacks_and_bombs_fail_alone_with_one_reason_and_little_memory(encoder, tmp_path):
    """Issue 14: a 13000 x 13000 PNG took the embedder to 4.1 GiB; paths outside the data
    directory were embedded; "no such file" and "not an image" told which files exist."""
    import os

    from tests.bombs import jpeg_bomb, peak_rss_growth, png_bomb

    images = tmp_path / "images"
    images.mkdir()
    png, jpeg = png_bomb(images / "bomb.png"), jpeg_bomb(images / "bomb.jpg")
    os.mkfifo(images / "fifo.png")
    (images / "escape.png").symlink_to("/etc/hostname")
    refused = [str(images / "fifo.png"), str(images / "escape.png"), "/etc/hostname",
               "images/../../../../etc/hostname", "file://attacker.example/etc/hostname",
               str(tmp_path / "missing-outside.png")]
    items = [state(n, uri) for n, uri in enumerate([str(png), str(jpeg), *refused])]
    items.append(state(99, make_image(images / "ok.png", 3)))
    results = []
    grown = peak_rss_growth(lambda: results.append(encoder.embed(items)))
    result = results[0]
    assert [r["project_id"] for r in result.rows] == [99]
    reasons = {item.project_id: why for item, why in result.failed}
    assert reasons[0].startswith("too many pixels") and reasons[1].startswith("too many")
    assert {reasons[n] for n in range(2, 2 + len(refused))} == {REFUSED}
    assert grown < 100 * 1024 * 1024, grown


def test_encoder_decodes_in_threads_with_the_same_result(encoder, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from services.embedder import encode

    images = tmp_path / "images"
    items = [state(i, make_image(images / f"{i}.png", i)) for i in range(5)]
    items.insert(2, state(99, make_corrupt(images / "bad.png")))
    alone = encoder.embed(items)
    monkeypatch.setattr(encode, "WORKERS_FROM", 1)
    encoder.pool = ThreadPoolExecutor(2)
    pooled = encoder.embed(items)
    assert [r["project_id"] for r in pooled.rows] == [0, 1, 2, 3, 4]
    assert [item.project_id for item, _ in pooled.failed] == [99]
    assert np.allclose([r["embedding"] for r in alone.rows],
                       [r["embedding"] for r in pooled.rows], atol=1e-6)


def freshness_count() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("cofeat_embed_freshness_seconds_count") or 0.0


def test_freshness_counts_only_events_produced_once_a_model_was_live():
    ready = [change(1, 0, 1_000), change(2, 1, 2_000), change(3, 2, 3_000)]
    failed = Written(failed={3: (state(3, "/x.png"), "OSError")})
    before = freshness_count()
    observe(ready, Written(), None)  # no model yet: nothing was searchable
    assert freshness_count() == before
    observe(ready, failed, 1_500)  # 1 came before the first model, 3 failed
    assert freshness_count() == before + 1
    observe(ready, Written(), 0.0)  # a model was live when the embedder started
    assert freshness_count() == before + 4
