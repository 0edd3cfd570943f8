"""From raw interactions to the training matrix: weigh, hold out, filter, and diff versions.

Confidence per (user, project) pair is 1 + alpha * log(1 + sum of event weights / eps)
(Hu, Koren and Volinsky's log scaling), so a hundred views do not outweigh a few
appreciations by a hundred to one. Then the least and the most popular users and projects
are dropped as in the paper (shared.filtering).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from services.refresh.factors.read import Interactions
from shared.events import InteractionType
from shared.filtering import filter_popularity
from shared.settings import Settings

# Values closer than this are the same confidence: sums may be added in another order.
SAME_VALUE = 1e-5


@dataclass(frozen=True)
class MatrixParams:
    weights: tuple[float, float, float, float]  # indexed by InteractionType
    alpha: float
    eps: float
    min_user_count: int
    min_item_count: int
    top_user_pct: float
    top_item_pct: float
    eval_fraction: float
    eval_max_users: int

    @classmethod
    def from_settings(cls, settings: Settings) -> MatrixParams:
        weights = {InteractionType.view: settings.weight_view,
                   InteractionType.appreciate: settings.weight_appreciate,
                   InteractionType.comment: settings.weight_comment,
                   InteractionType.own: settings.weight_own}
        return cls(weights=tuple(weights[t] for t in sorted(weights)),
                   alpha=settings.als_alpha, eps=settings.als_eps,
                   min_user_count=settings.filter_min_user_count,
                   min_item_count=settings.filter_min_item_count,
                   top_user_pct=settings.filter_top_user_pct,
                   top_item_pct=settings.filter_top_item_pct,
                   eval_fraction=settings.eval_fraction, eval_max_users=settings.eval_max_users)


@dataclass
class Training:
    """The filtered confidence matrix and, in its index space, the held-out pairs."""

    matrix: sp.csr_matrix  # float32, kept users x kept projects
    user_rows: np.ndarray  # kept users as indices into Interactions.user_ids (sorted)
    item_cols: np.ndarray  # kept projects as indices into Interactions.item_ids (sorted)
    heldout_user: np.ndarray  # row in `matrix` of each held-out pair
    heldout_item: np.ndarray  # column in `matrix`
    stats: dict = field(default_factory=dict)


@dataclass
class Change:
    """What differs between the previous version's matrix and the current one."""

    users: np.ndarray  # rows of the current matrix to re-solve
    items: np.ndarray  # columns of the current matrix to re-solve
    changed_nnz: int
    drift: float  # changed_nnz / current nnz


def weight_sums(data: Interactions, rows: np.ndarray, params: MatrixParams) -> sp.csr_matrix:
    """Summed event weights per (user, project) over the selected rows, global index space."""
    weights = np.asarray(params.weights, dtype=np.float64)[data.type[rows]]
    shape = (len(data.user_ids), len(data.item_ids))
    sums = sp.csr_matrix((weights, (data.user[rows], data.item[rows])), shape=shape)
    sums.sum_duplicates()
    sums.eliminate_zeros()  # zero-weight event types add no pair
    return sums


def confidence(sums: sp.csr_matrix, alpha: float, eps: float) -> sp.csr_matrix:
    result = sums.copy()
    result.data = (1.0 + alpha * np.log1p(sums.data / eps)).astype(np.float32)
    return result


def user_hash(user_ids: np.ndarray) -> np.ndarray:
    """Hash values in [0, 1) per user id; the same users are sampled in every version."""
    x = user_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # splitmix64: wrapping multiplication is the point
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def choose_heldout(data: Interactions, rows: np.ndarray, sums: sp.csr_matrix,
                   params: MatrixParams) -> tuple[np.ndarray, np.ndarray]:
    """Each sampled user's latest appreciation (by seq), if the user has another project."""
    hashes = user_hash(data.user_ids)
    eligible = (hashes < params.eval_fraction) & (np.diff(sums.indptr) >= 2)
    if eligible.sum() > params.eval_max_users:
        cut = np.sort(hashes[eligible])[params.eval_max_users - 1]
        eligible &= hashes <= cut
    picked = rows[(data.type[rows] == InteractionType.appreciate) & eligible[data.user[rows]]]
    if not len(picked):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = picked[np.lexsort((data.seq[picked], data.user[picked]))]
    users = data.user[order]
    last = np.r_[users[1:] != users[:-1], True]
    return users[last].astype(np.int64), data.item[order[last]].astype(np.int64)


def build_training(data: Interactions, params: MatrixParams,
                   only_old: bool = False) -> Training:
    """The matrix a version trains on; `only_old` rebuilds the previous version's."""
    rows = np.flatnonzero(~data.is_new) if only_old else np.arange(data.n_rows)
    sums = weight_sums(data, rows, params)
    hu, hi = choose_heldout(data, rows, sums, params)
    if len(hu):
        held = sp.csr_matrix((np.ones(len(hu)), (hu, hi)), shape=sums.shape)
        sums = sums - sums.multiply(held)
        sums.eliminate_zeros()
    kept = filter_popularity(sums, min_user_count=params.min_user_count,
                             min_item_count=params.min_item_count,
                             top_user_pct=params.top_user_pct, top_item_pct=params.top_item_pct)
    matrix = confidence(sums, params.alpha, params.eps)[kept.rows][:, kept.cols].tocsr()
    matrix.sort_indices()
    eval_user, eval_item = _heldout_in(kept.rows, kept.cols, hu, hi)
    stats = {**{key: list(value) if isinstance(value, tuple) else value
                for key, value in kept.stats.items()},
             "heldout_pairs": len(eval_user), "rows_used": len(rows)}
    return Training(matrix, kept.rows, kept.cols, eval_user, eval_item, stats)


def _heldout_in(rows, cols, hu, hi) -> tuple[np.ndarray, np.ndarray]:
    """Held-out pairs whose user and project both survived filtering, in filtered indices."""
    u = np.searchsorted(rows, hu)
    i = np.searchsorted(cols, hi)
    ok = (u < len(rows)) & (i < len(cols))
    ok[ok] &= (rows[u[ok]] == hu[ok]) & (cols[i[ok]] == hi[ok])
    return u[ok].astype(np.int64), i[ok].astype(np.int64)


def embed(training: Training, shape: tuple[int, int]) -> sp.csr_matrix:
    """The filtered matrix placed back into the global (all ids of this read) index space."""
    coo = training.matrix.tocoo()
    return sp.csr_matrix((coo.data, (training.user_rows[coo.row], training.item_cols[coo.col])),
                         shape=shape)


def changes(current: Training, previous: Training, shape: tuple[int, int]) -> Change:
    """Rows and columns whose training entries differ: new events, users or projects that
    crossed a filter threshold either way, and held-out pairs that moved."""
    diff = embed(current, shape) - embed(previous, shape)
    diff.data[np.abs(diff.data) < SAME_VALUE] = 0
    diff.eliminate_zeros()
    users = _positions(current.user_rows, np.flatnonzero(np.diff(diff.indptr)))
    items = _positions(current.item_cols, np.unique(diff.indices))
    nnz = max(current.matrix.nnz, 1)
    return Change(users, items, int(diff.nnz), diff.nnz / nnz)


def _positions(sorted_values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in `sorted_values` of those `wanted` values it holds."""
    pos = np.searchsorted(sorted_values, wanted)
    ok = pos < len(sorted_values)
    ok[ok] &= sorted_values[pos[ok]] == wanted[ok]
    return pos[ok].astype(np.int64)
