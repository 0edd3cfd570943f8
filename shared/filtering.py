"""The paper's pre-processing: drop the least and the most popular users and items.

Used by the factorization service and by `cofeat simulate --stats`. Rows are users and
columns are items; a count is the number of distinct non-zero entries in a row or column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class FilterResult:
    rows: np.ndarray  # int64, sorted: kept row indices of the input
    cols: np.ndarray  # int64, sorted: kept column indices of the input
    stats: dict


def filter_popularity(matrix: sp.csr_matrix, *, min_user_count: int, min_item_count: int,
                      top_user_pct: float, top_item_pct: float) -> FilterResult:
    """Drop the top percent most popular rows and columns (once, by counts on the input),
    then repeatedly drop rows and columns whose counts fall below the minimums until none
    does. Among equal counts at the top cut, the lower index is dropped first."""
    binary = _binary(matrix)
    n_rows, n_cols = binary.shape
    # Counts through the data, so that a 0/1 input's zeros count as absent without a copy.
    row_counts = binary @ np.ones(n_cols, dtype=np.int32)
    col_counts = np.bincount(binary.indices, weights=binary.data, minlength=n_cols)
    keep_rows = ~_top(row_counts, top_user_pct)
    keep_cols = ~_top(col_counts, top_item_pct)
    iterations = 0
    while True:
        iterations += 1
        # Counts restricted to what is kept: one sparse product per side.
        rows_ok = keep_rows & (binary @ keep_cols.astype(np.int32) >= min_user_count)
        cols_ok = keep_cols & (binary.T @ rows_ok.astype(np.int32) >= min_item_count)
        if np.array_equal(rows_ok, keep_rows) and np.array_equal(cols_ok, keep_cols):
            break
        keep_rows, keep_cols = rows_ok, cols_ok
    rows, cols = np.flatnonzero(keep_rows), np.flatnonzero(keep_cols)
    nnz_after = int((binary @ keep_cols.astype(np.int32))[keep_rows].sum())
    stats = {
        "shape_before": (n_rows, n_cols), "nnz_before": int(row_counts.sum()),
        "density_before": _density(int(row_counts.sum()), n_rows, n_cols),
        "shape_after": (len(rows), len(cols)), "nnz_after": nnz_after,
        "density_after": _density(nnz_after, len(rows), len(cols)),
        "iterations": iterations,
    }
    return FilterResult(rows.astype(np.int64), cols.astype(np.int64), stats)


def _binary(matrix) -> sp.csr_matrix:
    """1 where the input has a non-zero entry (duplicates summed first, zeros dropped);
    a canonical int32 0/1 CSR input is used as it is. int32 counts: a count never exceeds
    the other side's size."""
    csr = sp.csr_matrix(matrix)  # no copy of a CSR input: its index arrays are shared
    if (csr.dtype == np.int32 and csr.has_canonical_format
            and not ((csr.data != 0) & (csr.data != 1)).any()):
        return csr
    if not csr.has_canonical_format or not csr.data.all():
        csr = csr.copy()
        csr.sum_duplicates()
        csr.eliminate_zeros()
    return sp.csr_matrix((np.ones(csr.nnz, dtype=np.int32), csr.indices, csr.indptr),
                         shape=csr.shape)


def _top(counts: np.ndarray, pct: float) -> np.ndarray:
    """Mask of the floor(n * pct / 100) largest counts."""
    drop = int(len(counts) * pct / 100)
    mask = np.zeros(len(counts), dtype=bool)
    if drop > 0:
        mask[np.argsort(-counts, kind="stable")[:drop]] = True
    return mask


def _density(nnz: int, n_rows: int, n_cols: int) -> float:
    return nnz / (n_rows * n_cols) if n_rows and n_cols else 0.0
