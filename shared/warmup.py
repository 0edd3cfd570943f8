"""Warm-up vectors for new projects: the CNN's prediction, corrected by the first
interactions, in one regularised least-squares solve (docs/factors.md#warm-up).

A factor version's implicit ALS gives an item the factor x minimising

    sum_u c_u (p_u - y_u . x)^2 + lambda |x|^2        (p_u = 1 where u interacted, else 0)

over all users u of the version, with c_u = 1 + alpha * log(1 + s_u / eps) for the summed
event weights s_u (services/refresh/factors/matrix.py). Its normal equations are

    (G + D) x = b,   G = Y'Y + lambda I,   D = sum_obs (c_u - 1) y_u y_u',   b = sum_obs c_u y_u.

G does not depend on the item: it is what every user who did *not* interact says (pull
towards zero). A new project's warm-up replaces that item-independent part by a prior
centred on the CNN's vector m (scaled to a typical item factor's norm):

    (strength * G + D) x = strength * G m + b

With no interactions D = 0 and b = 0, so x = m exactly: the CNN vector. Each interaction
adds to D and b, and with many of them the solution approaches the behavioural factor
(G + D)^-1 b that a factor refresh would give the project. `strength` is how many
"users' worth" of evidence the image counts for, relative to ALS's own regulariser.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

VIEW, APPRECIATE, COMMENT, OWN = range(4)  # shared.events.InteractionType codes


def confidence(sums: np.ndarray, alpha: float, eps: float) -> np.ndarray:
    """The factor refresh's confidence of a (user, project) pair from its summed weights."""
    return (1.0 + alpha * np.log1p(np.asarray(sums) / eps)).astype(np.float32)


@dataclass(frozen=True)
class WarmParams:
    weights: tuple[float, float, float, float]  # event weight by type code, as the refresh
    alpha: float
    eps: float
    regularization: float
    strength: float = 0.5  # COFEAT_WARM_PRIOR_STRENGTH

    @classmethod
    def from_settings(cls, settings) -> WarmParams:
        weights = (settings.weight_view, settings.weight_appreciate, settings.weight_comment,
                   settings.weight_own)
        return cls(weights=tuple(float(w) for w in weights), alpha=settings.als_alpha,
                   eps=settings.als_eps, regularization=settings.als_regularization,
                   strength=settings.warm_prior_strength)


@dataclass(frozen=True)
class Space:
    """What every fold-in against one factor version shares."""

    user_factors: np.ndarray  # float64 [n_users, k]
    gram: np.ndarray  # Y'Y + lambda I, float64 [k, k]
    prior_norm: float  # the length the CNN's unit direction is given

    @property
    def k(self) -> int:
        return self.user_factors.shape[1]


def space(user_factors: np.ndarray, item_factors: np.ndarray, regularization: float) -> Space:
    """The Gram matrix of a version's user factors, and the median length of its item
    factors: the CNN predicts a direction, ALS factors have a length."""
    users = np.asarray(user_factors, dtype=np.float64)
    if users.ndim != 2 or not users.shape[0]:
        raise ValueError("user factors must be a non-empty 2-d array")
    items = np.asarray(item_factors, dtype=np.float64)
    if items.ndim != 2 or items.shape[1] != users.shape[1]:
        raise ValueError(f"item factors of shape {items.shape} do not match user factors "
                         f"of width {users.shape[1]}")
    norms = np.linalg.norm(items, axis=1)
    norms = norms[norms > 0]
    prior_norm = float(np.median(norms)) if len(norms) else 1.0
    gram = users.T @ users + regularization * np.eye(users.shape[1])
    return Space(users, gram, prior_norm)


def pair_sums(user_rows: np.ndarray, types: np.ndarray,
              weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(distinct user rows, summed event weights) of one project's events; a zero sum adds
    no pair, as in the refresh."""
    user_rows, types = np.asarray(user_rows, np.int64), np.asarray(types, np.int64)
    if len(user_rows) != len(types):
        raise ValueError("one type per event")
    if len(types) and (types.min() < 0 or types.max() >= len(weights)):
        raise ValueError(f"unknown interaction type in {sorted(set(types.tolist()))}")
    rows, inverse = np.unique(user_rows, return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(weights, np.float64)[types],
                       minlength=len(rows))
    keep = sums > 0
    return rows[keep], sums[keep]


def centred(prior: np.ndarray, space: Space) -> np.ndarray:
    """The CNN's vector as a fold-in's starting point: its direction at a typical item
    factor's length. What a project with no interactions is served."""
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (space.k,) or not np.all(np.isfinite(prior)):
        raise ValueError(f"the prior must be {space.k} finite numbers, got shape {prior.shape}")
    length = float(np.linalg.norm(prior))
    if length == 0.0:
        raise ValueError("the prior is all zeros: no direction to start from")
    return prior * (space.prior_norm / length)


def fold_in(prior: np.ndarray, user_rows: np.ndarray, sums: np.ndarray, space: Space,
            params: WarmParams) -> np.ndarray:
    """The warm-up factor of one project: `prior` (the CNN's vector, any length) and the
    users (rows of space.user_factors) with their summed event weights."""
    centre = centred(prior, space)
    user_rows = np.asarray(user_rows, dtype=np.int64)
    if not len(user_rows):
        return centre
    if params.strength <= 0:
        raise ValueError("the prior strength must be positive")
    y = space.user_factors[user_rows]
    c = confidence(sums, params.alpha, params.eps).astype(np.float64)
    lhs = params.strength * space.gram + (y.T * (c - 1.0)) @ y
    rhs = params.strength * (space.gram @ centre) + y.T @ c
    return np.linalg.solve(lhs, rhs)


def served(vectors: np.ndarray, space: Space) -> np.ndarray:
    """Fold-ins as the warm collection holds them: ranked by inner product against a unit
    user vector, each at its length over the prior's. A project with no interactions then
    scores exactly as its unit CNN vector does by cosine in the projects collection, so
    the two rank together, and one that behaviour vouches for grows longer: ALS keeps how
    much evidence an item has in its factor's length, which cosine would throw away."""
    return (np.asarray(vectors, dtype=np.float64) / space.prior_norm).astype(np.float32)


def behavioural(user_rows: np.ndarray, sums: np.ndarray, space: Space,
                params: WarmParams) -> np.ndarray:
    """The factor ALS would give the project from these interactions alone (one exact
    item solve against the version's user factors): what the warm-up approaches."""
    y = space.user_factors[np.asarray(user_rows, dtype=np.int64)]
    c = confidence(sums, params.alpha, params.eps).astype(np.float64)
    return np.linalg.solve(space.gram + (y.T * (c - 1.0)) @ y, y.T @ c)
