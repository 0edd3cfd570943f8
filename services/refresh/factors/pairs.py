"""Summed event weights per (user, project) at one snapshot: what a factor version trains on.

A full refresh builds them from the store's `interaction_pairs`; an incremental one takes
its parent's (services/refresh/factors/cache.py) and adds the events that parent did not
see. Both give the same sums: pairs are only ever added to, and every event is counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from services.refresh.factors.read import NewEvents, PairRows, dense_index, distinct
from shared.events import InteractionType


@dataclass
class Pairs:
    user_ids: np.ndarray  # int64, sorted
    item_ids: np.ndarray  # int64, sorted
    sums: sp.csr_matrix  # float32 users x items, sorted indices: positive sums only
    latest_item: np.ndarray  # int64 per user: column of the latest appreciation, -1: none
    latest_seq: np.ndarray  # int64 per user: that appreciation's seq, -1: none
    snapshot: str
    watermark: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.sums.shape


def from_rows(rows: PairRows) -> Pairs:
    user_ids, user = dense_index(rows.user_id)
    item_ids, item = dense_index(rows.project_id)
    keep = rows.sum > 0  # a zero weight adds no pair
    shape = (len(user_ids), len(item_ids))
    sums = sp.csr_matrix((rows.sum[keep], (user[keep], item[keep])), shape=shape,
                         dtype=np.float32)
    sums.sort_indices()
    latest_item, latest_seq = _latest(
        np.full(shape[0], -1, np.int64), np.full(shape[0], -1, np.int64),
        _positions(user_ids, rows.appreciation_user),
        _positions(item_ids, rows.appreciation_project), rows.appreciation_seq)
    return Pairs(user_ids, item_ids, sums, latest_item, latest_seq, rows.snapshot,
                 rows.watermark)


def add_events(pairs: Pairs, events: NewEvents,
               weights: Sequence[float]) -> tuple[Pairs, np.ndarray]:
    """`pairs` plus `events`, in an index space grown by their new ids; and the users
    (indices into the result) whose sums changed."""
    user_ids = distinct(np.r_[pairs.user_ids, events.user_id])
    item_ids = distinct(np.r_[pairs.item_ids, events.project_id])
    umap = np.searchsorted(user_ids, pairs.user_ids)
    imap = np.searchsorted(item_ids, pairs.item_ids)
    shape = (len(user_ids), len(item_ids))
    user = np.searchsorted(user_ids, events.user_id)
    item = np.searchsorted(item_ids, events.project_id)
    weight = np.asarray(weights, dtype=np.float32)[events.type]
    delta = sp.csr_matrix((weight, (user, item)), shape=shape, dtype=np.float32)
    delta.sum_duplicates()
    delta.eliminate_zeros()
    sums = (remap(pairs.sums, umap, imap, shape) + delta).astype(np.float32, copy=False)
    sums.sort_indices()
    latest_item = np.full(shape[0], -1, np.int64)
    latest_seq = np.full(shape[0], -1, np.int64)
    latest_seq[umap] = pairs.latest_seq
    latest_item[umap] = np.where(pairs.latest_item >= 0, imap[pairs.latest_item], -1)
    appreciated = events.type == InteractionType.appreciate
    latest_item, latest_seq = _latest(latest_item, latest_seq, user[appreciated],
                                      item[appreciated], events.seq[appreciated])
    touched = distinct(user[weight != 0])
    return Pairs(user_ids, item_ids, sums, latest_item, latest_seq, events.snapshot,
                 events.watermark), touched


def remap(matrix: sp.csr_matrix, row_map: np.ndarray, col_map: np.ndarray,
          shape: tuple[int, int]) -> sp.csr_matrix:
    """`matrix` placed into a larger index space; both maps are increasing."""
    counts = np.zeros(shape[0], np.int64)
    counts[row_map] = np.diff(matrix.indptr)
    indptr = np.r_[0, np.cumsum(counts)]
    same_cols = len(col_map) == shape[1]  # increasing and as long: the identity
    indices = matrix.indices if same_cols else col_map[matrix.indices].astype(np.int32)
    return sp.csr_matrix((matrix.data, indices, indptr), shape=shape)


def _latest(latest_item, latest_seq, user, item, seq):
    """Each user's highest-seq appreciation, from the current one and candidates."""
    if len(seq):
        order = np.lexsort((seq, user))
        last = np.r_[user[order][1:] != user[order][:-1], True]
        top = order[last]
        newer = seq[top] > latest_seq[user[top]]
        latest_seq[user[top][newer]] = seq[top][newer]
        latest_item[user[top][newer]] = item[top][newer]
    return latest_item, latest_seq


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_ids, ids).astype(np.int64)
