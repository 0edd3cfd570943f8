"""One CNN refresh end to end: lock, targets from the current factors, train or fine-tune,
validate against the parent, version.

A refresh fine-tunes the live model on the current targets, over-sampling new and changed
projects; a full retrain runs when there is no parent, when asked, when the architecture
or target mode changed, or every `cnn_full_every` versions. Factor versions are aligned to
each other, so the parent's head still points into the same space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import psycopg
import torch

from services.refresh.cnn import versions
from services.refresh.cnn.dataset import changed_projects, live_images, training_projects
from services.refresh.runs import run_locked
from shared.cnn import current_cnn_version, model_path
from shared.factors import current_factor_version, factor_version, load_factors
from shared.images import ImageReader
from shared.logs import bound
from shared.settings import Settings
from shared.training import distributed
from shared.training.data import Augment
from shared.training.targets import make_targets
from shared.training.train import TrainConfig, evaluate, fine_tune, make_splits, train
from shared.vision import ModelConfig, load_model

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    status: str  # promoted | rejected | skipped
    reason: str
    version_id: int | None = None
    mode: str | None = None  # full | fine-tune
    metrics: dict = field(default_factory=dict)


def model_config(settings: Settings, out_dim: int) -> ModelConfig:
    return ModelConfig(backbone=settings.cnn_backbone, out_dim=out_dim,
                       feature=settings.cnn_feature, image_size=settings.cnn_image_size,
                       stem=settings.cnn_stem)


def train_config(settings: Settings, epochs: int) -> TrainConfig:
    return TrainConfig(mode=settings.cnn_mode, loss=settings.cnn_loss, epochs=epochs,
                       batch_size=settings.cnn_batch_size, lr=settings.cnn_lr,
                       seed=settings.cnn_seed, num_workers=settings.cnn_workers,
                       augment=Augment(hflip=settings.cnn_hflip))


def run_cnn_once(settings: Settings, *, full: bool = False,
                 show_progress: bool | None = None) -> RunResult:
    """Train or refresh the CNN once; skips when another run holds the lock or the live
    model already learned from the current factor version."""
    progress = sys.stderr.isatty() if show_progress is None else show_progress
    return run_locked(settings, "cnn", versions.LOCK_KEY,
                      lambda conn: _run_locked(conn, settings, full, progress),
                      RunResult("skipped", "another refresh holds the lock"))


def _run_locked(conn: psycopg.Connection, settings: Settings, full: bool,
                progress: bool) -> RunResult:
    factors_row = current_factor_version(conn)
    parent = current_cnn_version(conn)
    conn.commit()
    if factors_row is None:
        return RunResult("skipped", "no promoted factor version yet")
    if parent and parent["factor_version_id"] == factors_row["id"] and not full:
        return RunResult("skipped", f"v{parent['id']} already learned from factor version "
                                    f"{factors_row['id']}", parent["id"])
    factors = load_factors(settings.data_dir, factors_row)
    reader = ImageReader.from_settings(settings)
    projects = training_projects(factors, live_images(conn), reader)
    if len(projects.ids) < settings.cnn_min_projects:
        return RunResult("skipped", f"only {len(projects.ids)} projects with images")
    mode, reason = _plan(conn, settings, parent, full)
    log.info("%s CNN refresh on factor version %d: %s", mode, factors_row["id"], reason)
    version_id = versions.reserve_id(conn)
    try:
        with bound(model_version=version_id, factor_version=factors_row["id"]):
            return _train_and_store(conn, settings, version_id, parent, factors_row,
                                    projects, mode, progress)
    except BaseException:
        shutil.rmtree(settings.data_dir / "models" / "cnn" / f"v{version_id}",
                      ignore_errors=True)
        raise


def _plan(conn, settings: Settings, parent: dict | None, full: bool) -> tuple[str, str]:
    if full:
        return "full", "asked for"
    if parent is None:
        return "full", "no live model"
    wanted = {"backbone": settings.cnn_backbone, "image_size": settings.cnn_image_size,
              "mode": settings.cnn_mode, "feature": settings.cnn_feature,
              "stem": settings.cnn_stem, "init": _init(settings)}
    # Versions from before COFEAT_CNN_INIT existed started from scratch.
    had = {key: parent["params"].get(key, "scratch" if key == "init" else None)
           for key in wanted}
    if had != wanted:
        return "full", f"parameters changed: {had} -> {wanted}"
    since = conn.execute(
        "SELECT count(*) FROM model_versions WHERE kind = 'cnn' AND status = 'promoted' "
        "AND id > coalesce((SELECT max(id) FROM model_versions WHERE kind = 'cnn' "
        "AND status = 'promoted' AND params->>'refresh' = 'full'), 0)").fetchone()[0]
    conn.commit()
    if since >= settings.cnn_full_every:
        return "full", f"{since} fine-tunes since the last full retrain"
    return "fine-tune", f"from v{parent['id']}"


def _train_and_store(conn, settings: Settings, version_id: int, parent: dict | None,
                     factors_row: dict, projects, mode: str, progress: bool) -> RunResult:
    centroids = _parent_centroids(settings, parent) if mode == "fine-tune" else None
    targets = make_targets(projects.factors, settings.cnn_mode, k=settings.cnn_pseudo_classes,
                           seed=settings.cnn_seed, init=centroids)
    train_split, val_split = make_splits(projects.ids, projects.paths, targets.values,
                                         targets.usable, settings.cnn_val_fraction,
                                         settings.cnn_holdout_salt, reader=projects.reader)
    run_dir = _run_dir(settings, factors_row["id"], parent, mode, projects.ids)
    if mode == "fine-tune":
        parent_factors = _factors_of(settings, conn, parent["factor_version_id"])
        changed = changed_projects(projects, parent_factors)
        in_train = np.isin(projects.ids, train_split.ids)
        result = distributed.call(fine_tune, model_path(settings.data_dir, parent),
                                  train_split, val_split, changed[in_train],
                                  train_config(settings, settings.cnn_refresh_epochs), run_dir,
                                  progress=progress)
        n_changed = int(changed[in_train].sum())
    else:
        config = model_config(settings, targets.out_dim)
        result = distributed.call(train, config, train_split, val_split,
                                  train_config(settings, settings.cnn_epochs), run_dir,
                                  init_from=_pretrained(settings, config, run_dir),
                                  progress=progress)
        n_changed = len(train_split)
    metrics = dict(result.metrics)
    metrics["parent_val_score"] = _parent_score(settings, parent, val_split, mode)
    status = promotion(settings, metrics)
    params = _params(settings, result.model.config, mode, targets)
    meta = {"parent": parent["id"] if parent else None, "factor_version": factors_row["id"],
            "params": params, "metrics": metrics, "history": result.history,
            "centroids": targets.centroids.tolist() if targets.centroids is not None else None}
    artifact = versions.write_artifact(settings.data_dir, version_id, run_dir, meta)
    stats = {**projects.stats, "train": len(train_split), "val": len(val_split),
             "changed_oversampled": n_changed, "skipped_images": len(result.skipped),
             "processes": distributed.size()}
    versions.insert_version(conn, version_id, parent_id=parent["id"] if parent else None,
                            factor_version_id=factors_row["id"], params=params, stats=stats,
                            metrics=metrics, artifact=artifact, status=status)
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("CNN version %d %s: %s", version_id, status, metrics)
    return RunResult(status, f"{mode} on factor version {factors_row['id']}", version_id,
                     mode, metrics)


def promotion(settings: Settings, metrics: dict) -> str:
    """Promote unless the held-out score is worse than the parent's on the same data by
    more than the margin."""
    new, old = metrics.get("val_score"), metrics.get("parent_val_score")
    if new is None or not np.isfinite(new):
        return "rejected"
    if old is None or not np.isfinite(old):
        return "promoted"
    return "promoted" if new >= old - settings.cnn_promote_margin else "rejected"


def _parent_score(settings: Settings, parent: dict | None, val_split, mode: str) -> float | None:
    """The live model's score on today's held-out targets: the bar a new model must clear."""
    if parent is None or not len(val_split):
        return None
    model, extra = load_model(model_path(settings.data_dir, parent), torch.device("cpu"))
    config = replace(TrainConfig(**{k: v for k, v in extra["train_config"].items()
                                    if k != "augment"}), augment=None)
    if config.mode != settings.cnn_mode or (
            config.mode == "regress" and model.config.out_dim != val_split.targets.shape[1]):
        return None
    from shared.training.data import ImageTargets

    data = ImageTargets(val_split.paths, val_split.targets, model.config.image_size,
                        reader=val_split.reader)
    return evaluate(model, data, config, torch.device("cpu"))["val_score"]


def _parent_centroids(settings: Settings, parent: dict) -> np.ndarray | None:
    from shared.artifacts import read_json

    meta = read_json(settings.data_dir / parent["artifact"] / "meta.json")
    centroids = meta.get("centroids")
    return np.asarray(centroids, dtype=np.float32) if centroids else None


def _factors_of(settings: Settings, conn, version_id: int | None):
    row = factor_version(conn, version_id) if version_id is not None else None
    conn.commit()
    if row is None or row.get("artifact") is None:
        return None
    try:
        return load_factors(settings.data_dir, row)
    except OSError:
        return None


def _init(settings: Settings) -> str:
    from shared.imagenet import resolve_init

    return resolve_init(settings.cnn_backbone, settings.cnn_init)


def _pretrained(settings: Settings, config: ModelConfig, run_dir: Path) -> Path | None:
    """Backbone weights from a local file (nothing can be downloaded), as a start model:
    COFEAT_CNN_WEIGHTS, or the packaged ImageNet file with COFEAT_CNN_INIT=imagenet."""
    from shared.imagenet import init_weights, start_model

    path = init_weights(settings.cnn_backbone, settings.cnn_init, settings.cnn_weights)
    return None if path is None else start_model(config, path, run_dir / "pretrained.pt")


def _run_dir(settings: Settings, factor_id: int, parent: dict | None, mode: str,
             ids: np.ndarray) -> Path:
    """Named after everything the run depends on, so an interrupted run resumes from its
    checkpoints and a run on other inputs starts clean. Runs held under the lock are the
    only ones, so any other directory is an interrupted run that can no longer resume."""
    parent_id = parent["id"] if parent and mode == "fine-tune" else 0
    cnn_settings = settings.model_dump(mode="json", include={
        name for name in Settings.model_fields if name.startswith("cnn_")})
    if distributed.size() > 1:  # sets the steps per epoch: others' checkpoints cannot resume
        cnn_settings["processes"] = distributed.size()
    digest = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()
                            + json.dumps(cnn_settings, sort_keys=True).encode()).hexdigest()
    root = settings.data_dir / "checkpoints" / "cnn"
    name = f"f{factor_id}-p{parent_id}-{mode}-{digest[:12]}"
    for stale in root.glob("*") if root.exists() else []:
        if stale.name != name:
            log.info("removing %s: an interrupted run on other inputs", stale)
            shutil.rmtree(stale, ignore_errors=True)
    return root / name


def _params(settings: Settings, config: ModelConfig, mode: str, targets) -> dict:
    return {**asdict(config), "mode": settings.cnn_mode, "refresh": mode,
            "init": _init(settings),
            "loss": settings.cnn_loss, "epochs": settings.cnn_epochs
            if mode == "full" else settings.cnn_refresh_epochs,
            "val_fraction": settings.cnn_val_fraction,
            "holdout_salt": settings.cnn_holdout_salt, "seed": settings.cnn_seed,
            "pseudo_classes": targets.out_dim if settings.cnn_mode == "pseudo-class" else None}
