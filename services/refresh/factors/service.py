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

from services.refresh.factors import align, als, cache, telemetry, versions
from services.refresh.factors.matrix import MatrixParams, Training, build_training, changes
from services.refresh.factors.pairs import Pairs, add_events
from services.refresh.factors.pairs import from_rows as pairs_from_rows
from services.refresh.factors.quality import compare_with_parent, evaluate, factor_ranks
from services.refresh.factors.read import any_new_since, read_new_events, read_pairs
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
    engine: dict | None = None  # how the Spark engine ran (master, regParam)


def version_params(settings: Settings) -> dict:
    return {"matrix": asdict(MatrixParams.from_settings(settings)),
            "als": asdict(als.AlsParams.from_settings(settings)), "k_eval": settings.eval_k,
            "engine": settings.factors_engine}


def _defining(params: dict) -> dict:
    # Versions from before engines were recorded were all fitted by implicit.
    return {**params, "engine": params.get("engine", "implicit"),
            "als": {key: value for key, value in params["als"].items()
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
    mparams = MatrixParams.from_settings(settings)
    if not full and _rejected_without_news(conn, parent, params):
        return RunResult("skipped", "no new interactions since the last rejected version")
    snapshot = parent["stats"].get("snapshot") if parent else None
    if (parent and not full and snapshot and _same_params(parent, params)
            and not any_new_since(conn, snapshot)):
        log.info("no interactions since version %d; nothing to do", parent["id"])
        return RunResult("skipped", "no new interactions", parent["id"])
    parent_factors = _parent_factors(settings, parent)
    due = _full_refit_due(settings, params, parent, full)
    if not due and parent_factors is None:
        due = "parent artifact unreadable"
    cached = None if due else cache.load(settings.data_dir, parent, mparams.weights)
    if not due and cached is None:
        due = "no pair cache for the parent version"
    with telemetry.timed("read", timings):
        read = _read(conn, mparams, cached, snapshot, progress)
        conn.isolation_level = None
    with telemetry.timed("matrix", timings):
        current = build_training(read.pairs, mparams)
    telemetry.record_matrix(current.stats)
    if current.matrix.nnz == 0:
        return RunResult("skipped", "no interactions survive filtering")
    with telemetry.timed("plan", timings):
        plan = (Plan("full", due) if due else
                plan_incremental(settings, parent, parent_factors, cached, read, current))
    log.info("%s refresh: %s", plan.mode, plan.reason)
    version_id = versions.reserve_id(conn)
    try:
        with bound(factor_version=version_id):
            return _fit_and_store(conn, settings, params, version_id, parent, parent_factors,
                                  read, current, plan, timings, progress)
    except BaseException as error:
        versions.remove_dir(settings.data_dir, version_id)
        versions.record_failure(conn, version_id, parent["id"] if parent else None, params,
                                error)
        telemetry.VERSIONS.labels(plan.mode, "failed").inc()
        raise


@dataclass
class Read:
    """The pairs a version trains on, and how they were read."""

    pairs: Pairs
    source: str  # store: every pair from interaction_pairs; cache: the parent's + new events
    rows_read: int  # pairs (store) or events (cache) read from Postgres
    rows_new: int | None  # events the parent did not see (known when reading them)
    touched: np.ndarray | None = None  # users whose sums the new events changed
    folded: int | None = None  # pairs the store's fold wrote before a full read


def _read(conn, mparams: MatrixParams, cached: cache.Cached | None, snapshot: str | None,
          progress: bool) -> Read:
    bar = (lambda it: tqdm(it, desc="read", unit="range")) if progress else None
    if cached is None:
        rows = read_pairs(conn, mparams.weights, bar)
        count = len(rows.sum)
        return Read(pairs_from_rows(rows), "store", count, None if snapshot else count,
                    folded=rows.folded)
    events = read_new_events(conn, snapshot, bar)
    merged, touched = add_events(cached.pairs, events, mparams.weights)
    return Read(merged, "cache", len(events), len(events), touched)


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


def plan_incremental(settings: Settings, parent: dict, parent_factors: Factors,
                     cached: cache.Cached, read: Read, current: Training) -> Plan:
    previous = cached.training
    if not (np.array_equal(previous.kept_user_ids, parent_factors.user_ids)
            and np.array_equal(previous.kept_item_ids, parent_factors.item_ids)):
        return Plan("full", "parent's ids differ from its cached matrix")
    change = changes(current, read.pairs, previous, cached.pairs, read.touched,
                     MatrixParams.from_settings(settings))
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
    if settings.factors_engine == "spark":
        return "the spark engine refits in full"
    stats = parent["stats"]
    if stats.get("versions_since_full", 0) + 1 >= settings.refresh_full_every:
        return f"every {settings.refresh_full_every} versions"
    full_at = stats.get("full_at")
    age = time.time() - full_at if full_at else float("inf")
    if age >= settings.refresh_full_max_age_s:
        return f"last full refit {age:.0f} s ago"
    return None


def _fit_and_store(conn, settings, params, version_id, parent, parent_factors, read: Read,
                   current, plan, timings, progress) -> RunResult:
    pairs = read.pairs
    user_ids = pairs.user_ids[current.user_rows]
    item_ids = pairs.item_ids[current.item_cols]
    with telemetry.timed(f"fit_{plan.mode}", timings):
        users, items, alignment = fit_version(
            current.matrix, als.AlsParams.from_settings(settings), parent_factors, user_ids,
            item_ids, plan, progress,
            spark=settings if settings.factors_engine == "spark" else None)
    with telemetry.timed("evaluate", timings):
        ranks = factor_ranks(users, items, current.matrix, current.heldout_user,
                             current.heldout_item)
        metrics = evaluate(users, items, current.matrix, current.heldout_user,
                           current.heldout_item, settings.eval_k, ranks)
        if parent_factors is not None:
            metrics.update(_against_parent(settings, parent_factors, users, items, user_ids,
                                           item_ids, current, ranks))
    metrics.update(alignment.as_metrics() if alignment else {})
    metrics = versions.clean(metrics)  # as stored: NaN (nothing to align) becomes None
    status = promotion(settings, metrics)
    stats = _stats(version_id, parent, read, current, plan, timings)
    meta = {"version": version_id, "parent_id": parent["id"] if parent else None,
            "mode": plan.mode, "snapshot": pairs.snapshot, "watermark": pairs.watermark,
            "created_at": datetime.now(UTC).isoformat(), "params": params}
    factors = Factors(users, items, user_ids, item_ids, meta)
    with telemetry.timed("write", timings):
        artifact = versions.write_artifact(settings.data_dir, version_id, factors)
        if status == "promoted":  # the next refresh's parent: it starts from these pairs
            _save_cache(settings, version_id, parent, pairs, current)
        versions.insert_version(conn, version_id, parent_id=meta["parent_id"],
                                watermark=pairs.watermark, params=params, stats=stats,
                                metrics=metrics, artifact=artifact, status=status)
    telemetry.VERSIONS.labels(plan.mode, status).inc()
    telemetry.record_quality(metrics, settings.eval_k)
    log.info("factor version %d %s (%s): recall@%d %s, popular %s", version_id, status,
             plan.mode, settings.eval_k, metrics.get(f"recall@{settings.eval_k}"),
             metrics.get(f"popular_recall@{settings.eval_k}"))
    return RunResult(status, plan.reason, version_id, plan.mode, stats, metrics)


def _save_cache(settings: Settings, version_id: int, parent: dict | None, pairs: Pairs,
                current: Training) -> None:
    try:
        cache.save(settings.data_dir, version_id, pairs, current.state(pairs),
                   MatrixParams.from_settings(settings).weights,
                   keep=parent["id"] if parent else None)
    except OSError as error:  # an optimisation only: the next refresh reads the store
        log.warning("could not write the pair cache of version %d: %s", version_id, error)


def fit_version(matrix, params: als.AlsParams, parent: Factors | None, user_ids, item_ids,
                plan: Plan, progress: bool = False, spark: Settings | None = None):
    """(user factors, item factors, alignment to the parent or None); full fits on Spark
    when `spark` (the settings naming the cluster) is given."""
    prev_u = (parent.user_ids, parent.user_factors) if parent else (None, None)
    prev_i = (parent.item_ids, parent.item_factors) if parent else (None, None)
    if plan.mode == "full" and spark is not None:
        from services.refresh.factors import spark as spark_engine

        users, items, plan.engine = spark_engine.fit_full(matrix, params, spark.als_alpha,
                                                          spark)
    elif plan.mode == "full":
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
                    current: Training, ranks) -> dict:
    k = parent.item_factors.shape[1]  # may differ from the candidate's after a change
    parent_users = als.grow(parent.user_ids, np.asarray(parent.user_factors), user_ids, k, None)
    parent_items = als.grow(parent.item_ids, np.asarray(parent.item_factors), item_ids, k, None)
    known = np.isin(user_ids, parent.user_ids)
    return compare_with_parent((users, items), (parent_users, parent_items), known,
                               current.matrix, current.heldout_user, current.heldout_item,
                               settings.eval_k, ranks)


def promotion(settings: Settings, metrics: dict) -> str:
    """'rejected' when, on the same held-out pairs, recall@k is more than the margin
    (relative) below the parent's."""
    key = f"recall@{settings.eval_k}"
    mine, theirs = metrics.get(f"candidate_{key}"), metrics.get(f"parent_{key}")
    if mine is None or theirs is None:
        return "promoted"
    return "rejected" if mine < theirs * (1 - settings.refresh_promote_margin) else "promoted"


def _stats(version_id, parent, read: Read, current: Training, plan: Plan,
           timings) -> dict:
    stats = {**current.stats, "snapshot": read.pairs.snapshot, "read_from": read.source,
             "rows_read": read.rows_read, "rows_new": read.rows_new,
             "pairs_folded": read.folded, "mode": plan.mode, "spark": plan.engine,
             "reason": plan.reason, "timings": timings}
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
