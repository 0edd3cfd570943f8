"""The simulator's hidden attributes, kept for evaluation only.

Layout under `<data_dir>/groundtruth/`: `truth.npz` (arrays) and `world.json` (sizes, seed
and parameters). Pipeline services (ingest, refresh, embedder, serve) must never import
this module: a test walks their source to enforce it, so learned features cannot peek.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FOLDER = "groundtruth"
ARRAYS = "truth.npz"
META = "world.json"


@dataclass
class GroundTruth:
    project_ids: np.ndarray       # int64
    project_style: np.ndarray     # int16, index into the style table
    project_category: np.ndarray  # int16
    project_palette: np.ndarray   # int16: styles sharing a palette differ in texture
    project_texture: np.ndarray   # int16
    user_ids: np.ndarray          # int64
    user_style_pref: np.ndarray   # (users, styles) float32, 0 = indifferent
    user_category_pref: np.ndarray  # (users, categories) float32
    meta: dict = field(default_factory=dict)

    def style_of(self, project_ids) -> np.ndarray:
        """Styles for project ids (ids need not be contiguous)."""
        return self.project_style[self._project_rows(project_ids)]

    def category_of(self, project_ids) -> np.ndarray:
        return self.project_category[self._project_rows(project_ids)]

    def _project_rows(self, project_ids) -> np.ndarray:
        wanted = np.asarray(project_ids)
        order = np.argsort(self.project_ids)
        at = np.searchsorted(self.project_ids, wanted, sorter=order)
        rows = order[np.minimum(at, len(order) - 1)]
        if not np.array_equal(self.project_ids[rows], wanted):
            raise KeyError("unknown project id")
        return rows


def folder(data_dir: Path) -> Path:
    return Path(data_dir) / FOLDER


def write(data_dir: Path, truth: GroundTruth) -> Path:
    target = folder(data_dir)
    target.mkdir(parents=True, exist_ok=True)
    arrays = {name: value for name, value in vars(truth).items() if name != "meta"}
    # Write then rename, so a reader never sees half a file.
    partial = target / (ARRAYS + ".partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(target / ARRAYS)
    (target / META).write_text(json.dumps(truth.meta, indent=2, sort_keys=True) + "\n")
    return target


def read(data_dir: Path) -> GroundTruth:
    source = folder(data_dir)
    with np.load(source / ARRAYS) as arrays:
        values = {name: arrays[name] for name in arrays.files}
    return GroundTruth(**values, meta=json.loads((source / META).read_text()))
