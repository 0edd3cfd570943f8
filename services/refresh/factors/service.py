"""One factor refresh end to end: lock, read, build, plan, fit, align, score, version.

A refresh is incremental (re-solve only rows whose training entries changed since the
parent version) unless a full refit is due: no parent, asked for, parameters changed,
every `refresh_full_every` versions, older than `refresh_full_max_age_s`, or when the
changed share of non-zeros since the last full refit exceeds `refresh_drift_threshold`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import psycopg
from tqdm.auto import tqdm

from services.refresh.factors import align, als, telemetry, versions
from services.refresh.factors.matrix import MatrixParams, Training, build_training, changes
from services.refresh.factors.quality import compare_with_parent, evaluate
from services.refresh.factors.read import Interactions, any_new_since, read_interactions
from services.refresh.runs import run_locked
from shared.factors import Factors, current_factor_version, load_factors
from shared.logs import bound
from shared.settings import Settings

log = logging.getLogger(__name__)
# Parameters that change what the factors mean: a change forces a full refit.
RUNTIME_PARAMS = ("iterations", "threads", "use_gpu", "sweeps")


@dataclass
class RunResult:
    status: str  # promoted | rejected | skipped
    reason: str
    version_id: int | None = None
    mode: str | None = None  # full | incremental
    stats: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


@dataclass
class Plan:
    mode: str
    reason: str
    change: object = None  # matrix.Change for incremental refreshes


def version_params(settings: Settings) -> dict:
    return {"matrix": asdict(MatrixParams.from_settings(settings)),
            "als": asdict(als.AlsParams.from_settings(settings)), "k_eval": settings.eval_k}


def _defining(params: dict) -> dict:
    return {**params, "als": {key: value for key, value in params["als"].items()
                              if key not in RUNTIME_PARAMS}}


def run_factors_once(settings: Settings, *, full: bool = False,
                     show_progress: bool | None = None) -> RunResult:
    """Refresh the factors once; skips when another run holds the lock or nothing is new."""
    progress = sys.stderr.isatty() if show_progress is None else show_progress
    return run_locked(settings, "factors", versions.LOCK_KEY,
                      lambda conn: _run_locked(conn, settings, full, progress),
                      RunResult("skipped", "another refresh holds the lock"))


def _run_locked(conn: psycopg.Connection, settings: Settings, full: bool,
                progress: bool) -> RunResult:
    timings: dict = {}
    parent = current_factor_version(conn)
    conn.commit()
    params = version_params(settings)
    if not full and _rejected_without_news(conn, parent, params):
        return RunResult("skipped", "no new interactions since the last rejected version")
    with telemetry.timed("read", timings):
        bar = (lambda it: tqdm(it, desc="read", unit="range")) if progress else None
        data = read_interactions(conn, parent["stats"].get("snapshot") if parent else None,
                                 bar)
        conn.isolation_level = None
    if parent and not full and not data.is_new.any() and _same_params(parent, params):
        log.info("no interactions since version %d; nothing to do", parent["id"])
        return RunResult("skipped", "no new interactions", parent["id"])
    with telemetry.timed("matrix", timings):
        current = build_training(data, MatrixParams.from_settings(settings))
    telemetry.record_matrix(current.stats)
    if current.matrix.nnz == 0:
        return RunResult("skipped", "no interactions survive filtering")
    parent_factors = _parent_factors(settings, parent)
    with telemetry.timed("plan", timings):
        plan = plan_refresh(settings, params, parent, parent_factors, data, current, full)
    log.info("%s refresh: %s", plan.mode, plan.reason)
    version_id = versions.reserve_id(conn)
    try:
        with bound(factor_version=version_id):
            return _fit_and_store(conn, settings, params, version_id, parent, parent_factors,
                                  data, current, plan, timings, progress)
    except BaseException as error:
        versions.remove_dir(settings.data_dir, version_id)
        versions.record_failure(conn, version_id, parent["id"] if parent else None, params,
                                error)
        telemetry.VERSIONS.labels(plan.mode, "failed").inc()
        raise


def _same_params(version: dict, params: dict) -> bool:
    return _defining(version["params"]) == _defining(versions.clean(params))


def _rejected_without_news(conn: psycopg.Connection, parent: dict | None,
                           params: dict) -> bool:
    """A version newer than the parent was rejected, with these parameters, and nothing
    arrived since: refitting the same data would only be rejected again."""
    latest = versions.latest_attempt(conn)
    if parent is None or latest is None or latest["id"] == parent["id"]:
        return False
    snapshot = latest["stats"].get("snapshot")
    return (snapshot is not None and _same_params(latest, params)
            and not any_new_since(conn, snapshot))


def _parent_factors(settings: Settings, parent: dict | None) -> Factors | None:
    if parent is None:
        return None
    try:
        return load_factors(settings.data_dir, parent)
    except (OSError, ValueError) as error:
        # Lost or damaged artifact: start over with a cold full refit rather than stall.
        log.warning("cannot load factor version %d (%s); refitting from scratch",
                    parent["id"], error)
        return None


def plan_refresh(settings: Settings, params: dict, parent: dict | None,
                 parent_factors: Factors | None, data: Interactions, current: Training,
                 full: bool) -> Plan:
    due = _full_refit_due(settings, params, parent, full)
    if due:
        return Plan("full", due)
    if parent_factors is None:
        return Plan("full", "parent artifact unreadable")
    previous = build_training(data, MatrixParams.from_settings(settings), only_old=True)
    if not (np.array_equal(data.user_ids[previous.user_rows], parent_factors.user_ids)
            and np.array_equal(data.item_ids[previous.item_cols], parent_factors.item_ids)):
        return Plan("full", "parent's ids differ from its snapshot's matrix")
    change = changes(current, previous, (len(data.user_ids), len(data.item_ids)))
    drift = parent["stats"].get("drift_since_full", 0.0) + change.drift
    if drift > settings.refresh_drift_threshold:
        return Plan("full", f"drift {drift:.3f} > {settings.refresh_drift_threshold}")
    return Plan("incremental", f"{len(change.users)} users, {len(change.items)} projects "
                f"changed (drift {drift:.3f})", change)


def _full_refit_due(settings: Settings, params: dict, parent: dict | None,
                    full: bool) -> str | None:
    if parent is None:
        return "first version"
    if full:
        return "requested"
    if not _same_params(parent, params):
        return "parameters changed"
    stats = parent["stats"]
    if stats.get("versions_since_full", 0) + 1 >= settings.refresh_full_every:
        return f"every {settings.refresh_full_every} versions"
    full_at = stats.get("full_at")
    age = time.time() - full_at if full_at else float("inf")
    if age >= settings.refresh_full_max_age_s:
        return f"last full refit {age:.0f} s ago"
    return None


def _fit_and_store(conn, settings, params, version_id, parent, parent_factors, data, current,
                   plan, timings, progress) -> RunResult:
    user_ids = data.user_ids[current.user_rows]
    item_ids = data.item_ids[current.item_cols]
    with telemetry.timed(f"fit_{plan.mode}", timings):
        users, items, alignment = fit_version(
            current.matrix, als.AlsParams.from_settings(settings), parent_factors, user_ids,
            item_ids, plan, progress)
    with telemetry.timed("evaluate", timings):
        metrics = evaluate(users, items, current.matrix, current.heldout_user,
                           current.heldout_item, settings.eval_k)
        if parent_factors is not None:
            metrics.update(_against_parent(settings, parent_factors, users, items, user_ids,
                                           item_ids, current))
    metrics.update(alignment.as_metrics() if alignment else {})
    metrics = versions.clean(metrics)  # as stored: NaN (nothing to align) becomes None
    status = promotion(settings, metrics)
    stats = _stats(version_id, parent, data, current, plan, timings)
    meta = {"version": version_id, "parent_id": parent["id"] if parent else None,
            "mode": plan.mode, "snapshot": data.snapshot, "watermark": data.watermark,
            "created_at": datetime.now(UTC).isoformat(), "params": params}
    factors = Factors(users, items, user_ids, item_ids, meta)
    with telemetry.timed("write", timings):
        artifact = versions.write_artifact(settings.data_dir, version_id, factors)
        versions.insert_version(conn, version_id, parent_id=meta["parent_id"],
                                watermark=data.watermark, params=params, stats=stats,
                                metrics=metrics, artifact=artifact, status=status)
    telemetry.VERSIONS.labels(plan.mode, status).inc()
    telemetry.record_quality(metrics, settings.eval_k)
    log.info("factor version %d %s (%s): recall@%d %s, popular %s", version_id, status,
             plan.mode, settings.eval_k, metrics.get(f"recall@{settings.eval_k}"),
             metrics.get(f"popular_recall@{settings.eval_k}"))
    return RunResult(status, plan.reason, version_id, plan.mode, stats, metrics)


def fit_version(matrix, params: als.AlsParams, parent: Factors | None, user_ids, item_ids,
                plan: Plan, progress: bool = False):
    """(user factors, item factors, alignment to the parent or None)."""
    prev_u = (parent.user_ids, parent.user_factors) if parent else (None, None)
    prev_i = (parent.item_ids, parent.item_factors) if parent else (None, None)
    if plan.mode == "full":
        rng = np.random.default_rng(params.seed)
        users, items = als.fit_full(
            matrix, params, als.grow(*prev_u, user_ids, params.factors, rng),
            als.grow(*prev_i, item_ids, params.factors, rng), show_progress=progress)
    else:
        telemetry.CHANGED_ROWS.labels("users").set(len(plan.change.users))
        telemetry.CHANGED_ROWS.labels("items").set(len(plan.change.items))
        new_users = np.flatnonzero(~np.isin(user_ids, parent.user_ids))
        new_items = np.flatnonzero(~np.isin(item_ids, parent.item_ids))
        users, items = als.update_rows(
            matrix, params, als.grow(*prev_u, user_ids, params.factors, None),
            als.grow(*prev_i, item_ids, params.factors, None), plan.change.users,
            plan.change.items, new_users, new_items)
    if parent is None:
        return users, items, None
    alignment = align.fit_rotation(parent.item_ids, np.asarray(parent.item_factors), item_ids,
                                   items, rotate=plan.mode == "full")
    users, items = align.apply(alignment, users, items)
    return users, items, alignment


def _against_parent(settings, parent: Factors, users, items, user_ids, item_ids,
                    current: Training) -> dict:
    k = parent.item_factors.shape[1]  # may differ from the candidate's after a change
    parent_users = als.grow(parent.user_ids, np.asarray(parent.user_factors), user_ids, k, None)
    parent_items = als.grow(parent.item_ids, np.asarray(parent.item_factors), item_ids, k, None)
    known = np.isin(user_ids, parent.user_ids)
    return compare_with_parent((users, items), (parent_users, parent_items), known,
                               current.matrix, current.heldout_user, current.heldout_item,
                               settings.eval_k)


def promotion(settings: Settings, metrics: dict) -> str:
    """'rejected' when, on the same held-out pairs, recall@k is more than the margin
    (relative) below the parent's."""
    key = f"recall@{settings.eval_k}"
    mine, theirs = metrics.get(f"candidate_{key}"), metrics.get(f"parent_{key}")
    if mine is None or theirs is None:
        return "promoted"
    return "rejected" if mine < theirs * (1 - settings.refresh_promote_margin) else "promoted"


def _stats(version_id, parent, data: Interactions, current: Training, plan: Plan,
           timings) -> dict:
    stats = {**current.stats, "snapshot": data.snapshot, "rows_read": data.n_rows,
             "rows_new": int(data.is_new.sum()), "mode": plan.mode, "reason": plan.reason,
             "timings": timings}
    if plan.mode == "full":
        stats.update(full_id=version_id, full_at=time.time(), versions_since_full=0,
                     drift_since_full=0.0)
    else:
        before = parent["stats"]
        stats.update(full_id=before.get("full_id"), full_at=before.get("full_at"),
                     versions_since_full=before.get("versions_since_full", 0) + 1,
                     drift_since_full=before.get("drift_since_full", 0.0) + plan.change.drift,
                     changed_users=len(plan.change.users), changed_items=len(plan.change.items),
                     changed_nnz=plan.change.changed_nnz)
    return stats
