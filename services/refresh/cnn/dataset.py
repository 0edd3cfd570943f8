"""What the CNN learns from: each project of a factor version with a readable image."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import psycopg

from shared.factors import Factors
from shared.images import ImageReader

log = logging.getLogger(__name__)


@dataclass
class Projects:
    ids: np.ndarray  # project ids, a subset of the factor version's items
    paths: list[str]
    factors: np.ndarray  # their rows of item_factors
    stats: dict
    reader: ImageReader | None = None  # how `paths` (image_uris) are read


def live_images(conn: psycopg.Connection) -> dict[int, str]:
    rows = conn.execute("SELECT project_id, image_uri FROM projects "
                        "WHERE status = 'live'").fetchall()
    conn.commit()
    return dict(rows)


def training_projects(factors: Factors, images: dict[int, str],
                      reader: ImageReader) -> Projects:
    """Projects with a factor, a live state and an image_uri the policy allows (refused
    ones are counted; images that turn out unreadable are skipped and counted by the
    trainer)."""
    ids, paths, rows = [], [], []
    no_project = refused = 0
    for row, project_id in enumerate(factors.item_ids.tolist()):
        uri = images.get(project_id)
        if uri is None:
            no_project += 1
            continue
        if not reader.allowed(uri):
            refused += 1
            continue
        ids.append(project_id)
        paths.append(uri)
        rows.append(row)
    stats = {"factor_items": len(factors.item_ids), "with_image": len(ids),
             "not_live": no_project, "image_refused": refused}
    if refused:
        log.warning("%d projects have an image_uri outside COFEAT_IMAGE_ROOTS/HOSTS/BUCKETS; "
                    "skipped", refused)
    return Projects(np.asarray(ids, dtype=np.int64), paths,
                    np.asarray(factors.item_factors)[rows], stats, reader)


def changed_projects(projects: Projects, parent: Factors | None,
                     threshold: float = 0.9) -> np.ndarray:
    """New projects, and those whose (aligned) factor moved: the ones a fine-tune
    over-samples."""
    if parent is None:
        return np.ones(len(projects.ids), dtype=bool)
    rows = parent.item_rows(projects.ids)
    changed = rows < 0
    old = np.asarray(parent.item_factors)[np.maximum(rows, 0)]
    cosine = np.sum(_unit(old) * _unit(projects.factors), axis=1)
    return changed | (cosine < threshold)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
