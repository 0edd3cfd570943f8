"""Keep consecutive versions in one coordinate system (orthogonal Procrustes).

ALS factors are defined only up to an invertible transform; a refit lands in a rotated
frame, so a CNN trained on the previous version would see its targets spin. Rotating both
user and item factors by the same orthogonal R leaves every score x·y unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import orthogonal_procrustes


@dataclass
class Alignment:
    rotation: np.ndarray  # k x k orthogonal
    shared: int  # projects in both versions
    error_before: float  # ||Y_new - Y_prev|| / ||Y_prev|| over shared projects
    error_after: float  # the same after rotating Y_new

    def as_metrics(self) -> dict:
        return {"alignment_shared": self.shared, "alignment_error_before": self.error_before,
                "alignment_error": self.error_after}


def shared_rows(prev_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows in prev, rows in new) of ids present in both (both id arrays sorted)."""
    common, prev_rows, new_rows = np.intersect1d(prev_ids, ids, assume_unique=True,
                                                 return_indices=True)
    return prev_rows, new_rows


def fit_rotation(prev_ids: np.ndarray, prev_items: np.ndarray, ids: np.ndarray,
                 items: np.ndarray, rotate: bool = True) -> Alignment:
    """The rotation taking the new item factors closest to the previous ones; identity
    when `rotate` is false (an incremental version already lives in its parent's frame)."""
    k = items.shape[1]
    prev_rows, new_rows = shared_rows(prev_ids, ids)
    source = items[new_rows].astype(np.float64)
    target = prev_items[prev_rows].astype(np.float64)
    rotation = np.eye(k)
    if rotate and len(new_rows) >= 2 and prev_items.shape[1] == k:
        rotation, _ = orthogonal_procrustes(source, target)
    return Alignment(rotation, len(new_rows), _relative(source, target),
                     _relative(source @ rotation, target))


def apply(alignment: Alignment, users: np.ndarray, items: np.ndarray):
    rotation = alignment.rotation.astype(np.float32)
    return (users @ rotation).astype(np.float32), (items @ rotation).astype(np.float32)


def _relative(source: np.ndarray, target: np.ndarray) -> float:
    if source.shape != target.shape or not len(target):
        return float("nan")
    norm = np.linalg.norm(target)
    return float(np.linalg.norm(source - target) / norm) if norm else 0.0
