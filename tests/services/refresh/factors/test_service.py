"""The factor refresh through the real store: full fits, incremental refreshes, versions."""

import threading

import numpy as np
import psycopg
import pytest

from services.refresh.factors import service, versions
from services.refresh.factors.service import run_factors_once
from shared.factors import current_factor_version, factor_version, load_factors
from tests.services.refresh.factors.synth import Events, store_events, taste_world

K = 20


def _load(settings, version_id):
    with psycopg.connect(settings.require_database_url()) as conn:
        row = factor_version(conn, version_id)
    return row, load_factors(settings.data_dir, row)


def _rows(db_url, sql):
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql).fetchall()


def test_full_fit_beats_most_popular(make_settings, stored_world):
    result = run_factors_once(make_settings())
    assert (result.status, result.mode) == ("promoted", "full")
    metrics = result.metrics
    assert metrics["eval_users"] >= 100
    assert metrics[f"recall@{K}"] > metrics[f"popular_recall@{K}"] + 0.1
    assert metrics[f"map@{K}"] > metrics[f"popular_map@{K}"]
    stats = result.stats
    assert stats["shape_after"][0] <= stats["shape_before"][0]
    assert stats["density_before"] > 0 and stats["density_after"] > 0


def _new_events(world: Events) -> Events:
    """1% more events from the same world, plus a new user (three appreciations) and a new
    project (three views: a view is never held out)."""
    more = taste_world(users=300, items=400, events=150, seed=2)
    known = np.unique(world.item)[:3]
    newcomer = Events(np.array([9_000_001] * 3 + [1_000, 1_001, 1_002]),
                      np.r_[known, [9_500_000] * 3], np.array([1, 1, 1, 0, 0, 0], np.int8))
    return Events(np.r_[more.user, newcomer.user], np.r_[more.item, newcomer.item],
                  np.r_[more.type, newcomer.type])


def _changed_rows(parent_ids, parent_factors, ids, factors):
    common, p, c = np.intersect1d(parent_ids, ids, return_indices=True)
    same = (parent_factors[p] == factors[c]).all(axis=1)
    return set(common[~same].tolist()), set(common[same].tolist())


def _users_of_new_items(everything, parent, child) -> set:
    new_items = np.setdiff1d(child.item_ids, parent.item_ids)
    return set(everything[0][np.isin(everything[1], new_items)].tolist())


def test_incremental_refresh_close_to_full_refit_and_local(db_url, make_settings,
                                                           stored_world):
    # No top-percent cut here, so which rows may change follows from the new events alone.
    settings = make_settings(filter_top_user_pct=0, filter_top_item_pct=0)
    first = run_factors_once(settings)
    extra = _new_events(stored_world)
    with psycopg.connect(db_url) as conn:
        store_events(conn, extra, prefix="n")
    second = run_factors_once(settings)
    assert (second.mode, second.status) == ("incremental", "promoted")
    _, parent = _load(settings, first.version_id)
    _, child = _load(settings, second.version_id)

    # New users and projects appear with non-zero factors.
    for ids, factors, new_id in ((child.user_ids, child.user_factors, 9_000_001),
                                 (child.item_ids, child.item_factors, 9_500_000)):
        row = int(np.searchsorted(ids, new_id))
        assert ids[row] == new_id and np.abs(factors[row]).sum() > 0

    # Exactly the planned rows moved; every other row is bit-identical to the parent's.
    moved_users, same_users = _changed_rows(parent.user_ids, parent.user_factors,
                                            child.user_ids, child.user_factors)
    moved_items, same_items = _changed_rows(parent.item_ids, parent.item_factors,
                                            child.item_ids, child.item_factors)
    new_users = len(np.setdiff1d(child.user_ids, parent.user_ids))
    new_items = len(np.setdiff1d(child.item_ids, parent.item_ids))
    assert second.stats["changed_users"] == len(moved_users) + new_users
    assert second.stats["changed_items"] == len(moved_items) + new_items
    assert len(same_users) > 100 and len(same_items) > 100
    # And they are explained by the new events: a user with new events, or a project with
    # new events or whose held-out pair returned to training (its user has new events).
    touched_users = set(extra.user.tolist())
    everything = np.r_[stored_world.user, extra.user], np.r_[stored_world.item, extra.item]
    items_of_touched = set(everything[1][np.isin(everything[0], list(touched_users))].tolist())
    assert moved_users <= touched_users | _users_of_new_items(everything, parent, child)
    assert moved_items <= set(extra.item.tolist()) | items_of_touched

    # Against a full refit of the same data, on the same held-out pairs.
    full = run_factors_once(settings, full=True)
    assert full.mode == "full"
    # Tolerance: 0.05 recall@20 (about 8 of ~150 held-out users on this tiny world).
    assert abs(second.metrics[f"recall@{K}"] - full.metrics[f"recall@{K}"]) <= 0.05
    assert second.metrics[f"recall@{K}"] > second.metrics[f"popular_recall@{K}"]


def test_nothing_new_skips_and_drift_forces_a_full_refit(db_url, make_settings,
                                                        stored_world):
    settings = make_settings(refresh_drift_threshold=0.001)
    run_factors_once(settings)
    assert run_factors_once(settings).reason == "no new interactions"
    with psycopg.connect(db_url) as conn:
        store_events(conn, _new_events(stored_world), prefix="n")
    result = run_factors_once(settings)
    assert result.mode == "full" and result.reason.startswith("drift")
    assert result.stats["versions_since_full"] == 0


def test_full_refit_every_n_versions(db_url, make_settings, stored_world):
    settings = make_settings(refresh_full_every=2)
    run_factors_once(settings)
    modes = []
    for n in range(3):
        with psycopg.connect(db_url) as conn:
            store_events(conn, taste_world(300, 400, 50, seed=10 + n), prefix=f"r{n}-")
        modes.append(run_factors_once(settings).mode)
    assert modes == ["incremental", "full", "incremental"]


def test_worse_version_is_rejected_and_current_stays(db_url, make_settings, stored_world):
    good = run_factors_once(make_settings())
    # An absurd regularization shrinks every factor to noise: recall collapses.
    bad = run_factors_once(make_settings(als_regularization=1e6), full=True)
    assert bad.status == "rejected"
    assert bad.metrics[f"candidate_recall@{K}"] < bad.metrics[f"parent_recall@{K}"]
    with psycopg.connect(db_url) as conn:
        assert current_factor_version(conn)["id"] == good.version_id
    # The same data would be rejected again: wait for new interactions.
    again = run_factors_once(make_settings(als_regularization=1e6))
    assert again.reason == "no new interactions since the last rejected version"


def test_crash_while_writing_leaves_no_partial_version(db_url, make_settings, stored_world,
                                                      monkeypatch):
    settings = make_settings()

    def crash(directory, factors):
        np.save(directory / "item_factors.npy", factors.item_factors)
        raise RuntimeError("disk full")

    monkeypatch.setattr(versions, "write_factors", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        run_factors_once(settings)
    root = settings.data_dir / "models" / "factors"
    assert list(root.iterdir()) == []
    assert _rows(db_url, "SELECT status, artifact FROM model_versions") == [("failed", None)]

    # Killed between the rename and the row: the directory is an orphan, removed next run.
    monkeypatch.undo()
    orphan = root / "v999"
    orphan.mkdir()
    (root / ".tmp-v998-abcd").mkdir()
    result = run_factors_once(settings)
    assert result.status == "promoted"
    assert sorted(p.name for p in root.iterdir()) == [f"v{result.version_id}"]
    with psycopg.connect(db_url) as conn:
        assert current_factor_version(conn)["id"] == result.version_id


def test_crash_after_rename_removes_the_directory(db_url, make_settings, stored_world,
                                                  monkeypatch):
    settings = make_settings()

    def fail(*args, **kwargs):
        raise psycopg.OperationalError("connection lost")

    monkeypatch.setattr(versions, "insert_version", fail)
    with pytest.raises(psycopg.OperationalError):
        run_factors_once(settings)
    assert list((settings.data_dir / "models" / "factors").iterdir()) == []
    with psycopg.connect(db_url) as conn:
        assert current_factor_version(conn) is None


def test_second_concurrent_run_skips(db_url, make_settings, stored_world, monkeypatch):
    settings = make_settings()
    with psycopg.connect(db_url) as holder, versions.refresh_lock(holder) as got:
        assert got
        assert run_factors_once(settings).status == "skipped"
    assert _rows(db_url, "SELECT count(*) FROM model_versions") == [(0,)]

    # Two real runs at once: the first waits inside its fit until the second has finished.
    second_done = threading.Event()
    fit = service.fit_version

    def slow_fit(*args, **kwargs):
        second_done.wait(30)
        return fit(*args, **kwargs)

    monkeypatch.setattr(service, "fit_version", slow_fit)
    results = {}
    first = threading.Thread(target=lambda: results.update(a=run_factors_once(settings)))
    first.start()
    while not _rows(db_url, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"):
        pass
    results["b"] = run_factors_once(settings)
    second_done.set()
    first.join(60)
    assert (results["a"].status, results["b"].status) == ("promoted", "skipped")
    assert _rows(db_url, "SELECT count(*) FROM model_versions") == [(1,)]


def test_lost_parent_artifact_means_a_cold_full_refit(db_url, make_settings, stored_world):
    import shutil

    settings = make_settings()
    first = run_factors_once(settings)
    shutil.rmtree(settings.data_dir / "models" / "factors" / f"v{first.version_id}")
    with psycopg.connect(db_url) as conn:
        store_events(conn, taste_world(300, 400, 50, seed=5), prefix="l")
    result = run_factors_once(settings)
    assert (result.mode, result.reason, result.status) == (
        "full", "parent artifact unreadable", "promoted")


def test_changed_factor_count_refits_without_new_events(make_settings, stored_world):
    first = run_factors_once(make_settings())
    result = run_factors_once(make_settings(als_factors=8))
    assert (result.mode, result.reason) == ("full", "parameters changed")
    # The parent (16 factors) is still scored on the same held-out pairs.
    assert result.metrics[f"parent_recall@{K}"] == pytest.approx(first.metrics[f"recall@{K}"])
    assert result.metrics["alignment_error"] is None  # no rotation between 16 and 8 factors


def test_incremental_pairs_equal_a_full_read_of_the_store(db_url, make_settings,
                                                          stored_world):
    from services.refresh.factors import cache
    from services.refresh.factors.matrix import MatrixParams
    from services.refresh.factors.pairs import from_rows
    from services.refresh.factors.read import read_pairs

    settings = make_settings()
    first = run_factors_once(settings)
    assert first.stats["read_from"] == "store"
    with psycopg.connect(db_url) as conn:
        store_events(conn, _new_events(stored_world), prefix="n")
    second = run_factors_once(settings)
    assert (second.mode, second.stats["read_from"]) == ("incremental", "cache")
    assert second.stats["rows_read"] == second.stats["rows_new"] == 156
    weights = MatrixParams.from_settings(settings).weights
    with psycopg.connect(db_url) as conn:
        row = factor_version(conn, second.version_id)
        conn.commit()
        stored = from_rows(read_pairs(conn, weights))
    kept = cache.load(settings.data_dir, row, weights).pairs
    for name in ("user_ids", "item_ids", "latest_item", "latest_seq"):
        assert np.array_equal(getattr(kept, name), getattr(stored, name)), name
    assert (kept.sums != stored.sums).nnz == 0
    # Only the parent's cache and the newest are kept.
    names = sorted(p.name for p in cache.root(settings.data_dir).iterdir())
    assert names == [f"pairs-v{first.version_id}", f"pairs-v{second.version_id}"]


def test_without_the_parents_cache_the_refresh_reads_the_store_and_refits(
        db_url, make_settings, stored_world):
    import shutil

    from services.refresh.factors import cache

    settings = make_settings()
    first = run_factors_once(settings)
    shutil.rmtree(cache.root(settings.data_dir) / f"pairs-v{first.version_id}")
    with psycopg.connect(db_url) as conn:
        store_events(conn, taste_world(300, 400, 50, seed=6), prefix="c")
    second = run_factors_once(settings)
    assert (second.mode, second.reason, second.stats["read_from"]) == (
        "full", "no pair cache for the parent version", "store")
    # A cache that is not the parent's (another snapshot) is not used either.
    with psycopg.connect(db_url) as conn:
        store_events(conn, taste_world(300, 400, 50, seed=7), prefix="d")
    meta = cache.root(settings.data_dir) / f"pairs-v{second.version_id}" / "meta.json"
    meta.write_text(meta.read_text().replace('"snapshot": "', '"snapshot": "9'))
    third = run_factors_once(settings)
    assert third.reason == "no pair cache for the parent version"
