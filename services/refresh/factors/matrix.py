"""From pair sums to the training matrix: hold out, weigh, filter, and diff versions.

Confidence per (user, project) pair is 1 + alpha * log(1 + sum of event weights / eps)
(Hu, Koren and Volinsky's log scaling), so a hundred views do not outweigh a few
appreciations by a hundred to one. Then the least and the most popular users and projects
are dropped as in the paper (shared.filtering).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from services.refresh.factors.cache import TrainingState
from services.refresh.factors.pairs import Pairs
from services.refresh.factors.read import distinct
from shared.events import InteractionType
from shared.filtering import filter_popularity
from shared.settings import Settings
from shared.warmup import confidence  # one formula for the refresh and the warm-up

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
    user_rows: np.ndarray  # kept users as indices into Pairs.user_ids (sorted)
    item_cols: np.ndarray  # kept projects as indices into Pairs.item_ids (sorted)
    heldout_user: np.ndarray  # row in `matrix` of each held-out pair that survived filtering
    heldout_item: np.ndarray  # column in `matrix`
    held_user: np.ndarray  # every held-out pair, as indices into Pairs.user_ids ...
    held_item: np.ndarray  # ... and Pairs.item_ids
    stats: dict = field(default_factory=dict)

    def state(self, pairs: Pairs) -> TrainingState:
        return TrainingState(pairs.user_ids[self.user_rows], pairs.item_ids[self.item_cols],
                             pairs.user_ids[self.held_user], pairs.item_ids[self.held_item])


@dataclass
class Change:
    """What differs between the previous version's matrix and the current one."""

    users: np.ndarray  # rows of the current matrix to re-solve
    items: np.ndarray  # columns of the current matrix to re-solve
    changed_nnz: int
    drift: float  # changed_nnz / current nnz


def user_hash(user_ids: np.ndarray) -> np.ndarray:
    """Hash values in [0, 1) per user id; the same users are sampled in every version."""
    x = user_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # splitmix64: wrapping multiplication is the point
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def choose_heldout(pairs: Pairs, params: MatrixParams) -> tuple[np.ndarray, np.ndarray]:
    """Each sampled user's latest appreciation (by seq), if the user has another project."""
    hashes = user_hash(pairs.user_ids)
    eligible = (hashes < params.eval_fraction) & (np.diff(pairs.sums.indptr) >= 2)
    if eligible.sum() > params.eval_max_users:
        cut = np.sort(hashes[eligible])[params.eval_max_users - 1]
        eligible &= hashes <= cut
    users = np.flatnonzero(eligible & (pairs.latest_item >= 0))
    return users.astype(np.int64), pairs.latest_item[users].astype(np.int64)


def _entry_positions(matrix: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Positions in matrix.data of the entries (rows[k], cols[k]) it has (sorted indices)."""
    found = []
    for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        at = start + int(np.searchsorted(matrix.indices[start:end], col))
        if at < end and matrix.indices[at] == col:
            found.append(at)
    return np.asarray(found, dtype=np.int64)


def build_training(pairs: Pairs, params: MatrixParams) -> Training:
    """The matrix a version trains on: held-out pairs removed, filtered, confidence.
    One pass over the pairs' arrays: at the paper's size every copy is gigabytes."""
    hu, hi = choose_heldout(pairs, params)
    sums = pairs.sums
    present = np.ones(sums.nnz, dtype=np.int32)
    present[_entry_positions(sums, hu, hi)] = 0  # held out: not trained on, not counted
    kept = filter_popularity(sp.csr_matrix((present, sums.indices, sums.indptr),
                                           shape=sums.shape),
                             min_user_count=params.min_user_count,
                             min_item_count=params.min_item_count,
                             top_user_pct=params.top_user_pct, top_item_pct=params.top_item_pct)
    matrix = _select(sums, kept.rows, kept.cols, present.astype(bool))
    del present
    matrix.data = confidence(matrix.data, params.alpha, params.eps)
    eval_user, eval_item = _heldout_in(kept.rows, kept.cols, hu, hi)
    stats = {**{key: list(value) if isinstance(value, tuple) else value
                for key, value in kept.stats.items()},
             "heldout_pairs": len(eval_user)}
    return Training(matrix, kept.rows, kept.cols, eval_user, eval_item, hu, hi, stats)


def _select(matrix: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray,
            keep: np.ndarray) -> sp.csr_matrix:
    """matrix[rows][:, cols] without the entries where `keep` is False, in one pass."""
    n_rows, n_cols = matrix.shape
    lengths = np.diff(matrix.indptr)
    mask = np.repeat(_mask(n_rows, rows), lengths)
    mask &= _mask(n_cols, cols)[matrix.indices]
    mask &= keep
    col_index = np.full(n_cols, -1, dtype=np.int32)
    col_index[cols] = np.arange(len(cols), dtype=np.int32)
    starts = np.minimum(matrix.indptr[:-1], max(len(mask) - 1, 0))
    counts = (np.add.reduceat(mask, starts, dtype=np.int64) if len(mask)
              else np.zeros(n_rows, np.int64))
    counts[lengths == 0] = 0
    indptr = np.r_[0, np.cumsum(counts[rows])]
    return sp.csr_matrix((matrix.data[mask], col_index[matrix.indices[mask]], indptr),
                         shape=(len(rows), len(cols)))


def _heldout_in(rows, cols, hu, hi) -> tuple[np.ndarray, np.ndarray]:
    """Held-out pairs whose user and project both survived filtering, in filtered indices."""
    u = np.searchsorted(rows, hu)
    i = np.searchsorted(cols, hi)
    ok = (u < len(rows)) & (i < len(cols))
    ok[ok] &= (rows[u[ok]] == hu[ok]) & (cols[i[ok]] == hi[ok])
    return u[ok].astype(np.int64), i[ok].astype(np.int64)


def changes(current: Training, pairs: Pairs, previous: TrainingState, old: Pairs,
            touched: np.ndarray, params: MatrixParams) -> Change:
    """Rows and columns whose training entries differ from the previous version's: new
    events, users or projects that crossed a filter threshold either way, and held-out
    pairs that moved. `old` holds the previous version's pairs, `touched` the users whose
    sums changed since; only rows that can differ are compared, entry by entry."""
    n_users, n_items = pairs.shape
    kept_user = _mask(n_users, current.user_rows)
    kept_item = _mask(n_items, current.item_cols)
    was_user = _mask(n_users, _found(pairs.user_ids, previous.kept_user_ids))
    was_item = _mask(n_items, _found(pairs.item_ids, previous.kept_item_ids))
    held = _held(n_users, current.held_user, current.held_item)
    was_held = _held(n_users, _found(pairs.user_ids, previous.held_user_ids),
                     _found(pairs.item_ids, previous.held_item_ids))
    flipped = (kept_item != was_item).astype(np.float32)
    candidate = _mask(n_users, touched) | (kept_user != was_user) | (held != was_held)
    candidate |= (pairs.sums @ flipped) > 0  # sums are positive: any entry in such a column
    rows = np.flatnonzero(candidate)
    diff = (_current_rows(current, rows, n_items)
            - _previous_rows(old, pairs, rows, was_user, was_item, was_held, params))
    diff.data[np.abs(diff.data) < SAME_VALUE] = 0
    diff.eliminate_zeros()
    users = _positions(current.user_rows, rows[np.flatnonzero(np.diff(diff.indptr))])
    items = _positions(current.item_cols, distinct(diff.indices))
    nnz = max(current.matrix.nnz, 1)
    return Change(users, items, int(diff.nnz), diff.nnz / nnz)


def _current_rows(current: Training, rows: np.ndarray, n_items: int) -> sp.csr_matrix:
    """The current matrix's entries in `rows` (Pairs indices), columns in Pairs indices."""
    pos = np.searchsorted(current.user_rows, rows)
    ok = pos < len(current.user_rows)
    ok[ok] &= current.user_rows[pos[ok]] == rows[ok]
    sub = current.matrix[pos[ok]]
    row = np.repeat(np.flatnonzero(ok), np.diff(sub.indptr))
    return sp.csr_matrix((sub.data, (row, current.item_cols[sub.indices])),
                         shape=(len(rows), n_items))


def _previous_rows(old: Pairs, pairs: Pairs, rows: np.ndarray, was_user, was_item, was_held,
                   params: MatrixParams) -> sp.csr_matrix:
    """The previous matrix's entries in `rows`, rebuilt from its pairs and choices."""
    pos = np.searchsorted(old.user_ids, pairs.user_ids[rows])
    ok = pos < len(old.user_ids)
    ok[ok] &= old.user_ids[pos[ok]] == pairs.user_ids[rows[ok]]
    ok &= was_user[rows]
    sub = old.sums[pos[ok]]
    row = np.repeat(np.flatnonzero(ok), np.diff(sub.indptr))
    col = np.searchsorted(pairs.item_ids, old.item_ids[sub.indices])
    keep = was_item[col] & (col != was_held[rows[row]])
    return sp.csr_matrix((confidence(sub.data[keep], params.alpha, params.eps),
                          (row[keep], col[keep])), shape=(len(rows), len(pairs.item_ids)))


def _mask(n: int, indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return mask


def _held(n_users: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    out = np.full(n_users, -1, np.int64)
    out[users] = items
    return out


def _found(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of `ids` in `sorted_ids`; every id must be there (ids only grow)."""
    pos = np.searchsorted(sorted_ids, ids)
    if len(ids) and (pos.max() >= len(sorted_ids) or (sorted_ids[pos] != ids).any()):
        raise ValueError("the previous version's ids are not all in the current pairs")
    return pos.astype(np.int64)


def _positions(sorted_values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in `sorted_values` of those `wanted` values it holds."""
    pos = np.searchsorted(sorted_values, wanted)
    ok = pos < len(sorted_values)
    ok[ok] &= sorted_values[pos[ok]] == wanted[ok]
    return pos[ok].astype(np.int64)
