"""Implicit ALS: full fits (warm-started) and incremental re-solves of changed rows.

BLAS runs single-threaded: implicit parallelizes over users itself, and a threaded BLAS
underneath oversubscribes the cores (implicit warns about exactly this).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from shared.settings import Settings

log = logging.getLogger(__name__)
INIT_SCALE = 0.01  # implicit's own random initialization scale
CG_STEPS = 3  # implicit's default per row and iteration


@dataclass(frozen=True)
class AlsParams:
    factors: int
    regularization: float
    iterations: int
    threads: int
    use_gpu: bool
    seed: int
    sweeps: int

    @classmethod
    def from_settings(cls, settings: Settings) -> AlsParams:
        return cls(factors=settings.als_factors, regularization=settings.als_regularization,
                   iterations=settings.als_iterations, threads=settings.als_threads,
                   use_gpu=settings.als_use_gpu, seed=settings.als_seed,
                   sweeps=settings.als_incremental_sweeps)


def gpu_available() -> bool:
    try:
        import implicit.gpu
    except ImportError:
        return False
    return bool(implicit.gpu.HAS_CUDA)


def cpu_model(params: AlsParams, user_factors=None, item_factors=None):
    from implicit.cpu.als import AlternatingLeastSquares

    # alpha=1: the matrix already holds the confidence (see matrix.confidence).
    model = AlternatingLeastSquares(
        factors=params.factors, regularization=params.regularization, alpha=1.0,
        dtype=np.float32, iterations=params.iterations, num_threads=params.threads,
        random_state=params.seed)
    model.user_factors = user_factors
    model.item_factors = item_factors
    return model


def grow(prev_ids: np.ndarray | None, prev_factors: np.ndarray | None, ids: np.ndarray,
         k: int, rng: np.random.Generator | None) -> np.ndarray:
    """Factors for `ids` (sorted): the previous row where the id had one, else random
    (rng given) or zero. implicit silently corrupts a fit whose preset factors are smaller
    than the matrix, so every run hands it arrays of exactly the right size."""
    if rng is None:
        out = np.zeros((len(ids), k), dtype=np.float32)
    else:
        out = (rng.random((len(ids), k), dtype=np.float32) * INIT_SCALE).astype(np.float32)
    if prev_ids is None or prev_factors is None or prev_factors.shape[1] != k:
        return out
    pos = np.searchsorted(prev_ids, ids)
    found = pos < len(prev_ids)
    found[found] &= prev_ids[pos[found]] == ids[found]
    out[found] = prev_factors[pos[found]]
    return out


def fit_full(matrix: sp.csr_matrix, params: AlsParams, user_init: np.ndarray,
             item_init: np.ndarray, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every row re-solved for `iterations` rounds, starting from the given factors."""
    assert user_init.shape == (matrix.shape[0], params.factors)
    assert item_init.shape == (matrix.shape[1], params.factors)
    with threadpool_limits(1, "blas"):
        model = cpu_model(params, user_init.copy(), item_init.copy())
        if params.use_gpu and gpu_available():
            log.info("fitting on the GPU")
            model = model.to_gpu()
            model.fit(matrix, show_progress=show_progress)
            model = model.to_cpu()
        else:
            model.fit(matrix, show_progress=show_progress)
    return _float32(model.user_factors), _float32(model.item_factors)


def update_rows(matrix: sp.csr_matrix, params: AlsParams, user_factors: np.ndarray,
                item_factors: np.ndarray, users: np.ndarray, items: np.ndarray,
                new_users: np.ndarray, new_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-solve only `users` and `items` (changed rows), each from its full row, users then
    projects; every other row keeps its factors bit for bit.

    Rows that are new to the model (`new_*`, a subset, starting at zero so they pull on
    nothing before they are solved) get an exact solve (implicit's partial_fit_*). Rows that
    existed get the conjugate-gradient steps a full fit gives every row, warm-started from
    their previous factors: an exact solve costs nnz*k^2 per row, and the changed projects
    include the popular ones, which carry most of the non-zeros."""
    item_users = matrix.T.tocsr()
    with threadpool_limits(1, "blas"):
        model = cpu_model(params, user_factors.copy(), item_factors.copy())
        _solve(model, "users", matrix, users, new_users, params)
        _solve(model, "items", item_users, items, new_items, params)
        # Later sweeps only re-solve rows new to the model: a new user whose projects are
        # all new saw only zeros in the first sweep. Changed old rows are warm already,
        # and each further pass over them costs as much as the first.
        for _ in range(params.sweeps - 1):
            _solve(model, "users", matrix, new_users, new_users, params)
            _solve(model, "items", item_users, new_items, new_items, params)
    return _float32(model.user_factors), _float32(model.item_factors)


def _solve(model, side: str, rows_matrix: sp.csr_matrix, rows: np.ndarray, new: np.ndarray,
           params: AlsParams) -> None:
    from implicit.cpu import _als

    factors = model.user_factors if side == "users" else model.item_factors
    other = model.item_factors if side == "users" else model.user_factors
    old = np.setdiff1d(rows, new, assume_unique=True)
    if len(old):
        warm = factors[old]  # a copy: fancy indexing
        _als.least_squares_cg(rows_matrix[old], warm, other, params.regularization,
                              num_threads=params.threads, cg_steps=CG_STEPS)
        factors[old] = warm
    if len(new):
        fit_new = model.partial_fit_users if side == "users" else model.partial_fit_items
        fit_new(new, rows_matrix[new])
    # The cached Gram matrices are stale once either side moved.
    model._YtY = model._XtX = None


def _float32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)
