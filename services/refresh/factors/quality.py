"""Held-out quality of a version: recall@k and MAP@k against the most-popular baseline.

Each sampled user has exactly one held-out project (their latest appreciation, removed
from training), so recall@k is the hit rate and AP@k is 1/rank when the project ranks in
the top k. Projects the user already interacted with in training are never recommended.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

BATCH_CELLS = 1 << 24  # users x projects scored at once (64 MB of float32)


def heldout_ranks(scores_for, train: sp.csr_matrix, users: np.ndarray,
                  items: np.ndarray) -> np.ndarray:
    """0-based rank of each held-out project among the projects its user has not seen;
    ties count half, so a constant score is not a free hit."""
    ranks = np.zeros(len(users), dtype=np.int64)
    batch = max(1, BATCH_CELLS // max(train.shape[1], 1))
    for start in range(0, len(users), batch):
        part = slice(start, start + batch)
        scores = scores_for(users[part])
        seen = train[users[part]]
        scores[np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr)), seen.indices] = -np.inf
        target = scores[np.arange(scores.shape[0]), items[part]][:, None]
        greater = (scores > target).sum(axis=1)
        ties = (scores == target).sum(axis=1) - 1
        ranks[part] = greater + ties // 2
    return ranks


def ranking_metrics(ranks: np.ndarray, k: int) -> dict:
    if not len(ranks):
        return {f"recall@{k}": None, f"map@{k}": None}
    hits = ranks < k
    return {f"recall@{k}": float(hits.mean()),
            f"map@{k}": float(np.where(hits, 1.0 / (ranks + 1), 0.0).mean())}


def popular_ranks(train: sp.csr_matrix, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """heldout_ranks for scores = each project's number of training users, without a
    users x projects score matrix: counts over all projects minus the user's seen ones."""
    popularity = np.bincount(train.indices, minlength=train.shape[1])
    ordered = np.sort(popularity)
    target = popularity[items]
    above = len(ordered) - np.searchsorted(ordered, target, side="right")
    equal = len(ordered) - above - np.searchsorted(ordered, target, side="left")
    seen = train[users]
    row = np.repeat(np.arange(len(users)), np.diff(seen.indptr))
    seen_score = popularity[seen.indices]
    above = above - np.bincount(row, weights=seen_score > target[row], minlength=len(users))
    equal = equal - np.bincount(row, weights=seen_score == target[row], minlength=len(users))
    return (above + (equal - 1) // 2).astype(np.int64)


def factor_ranks(user_factors: np.ndarray, item_factors: np.ndarray, train: sp.csr_matrix,
                 users: np.ndarray, items: np.ndarray) -> np.ndarray:
    def scores(batch):
        return user_factors[batch] @ item_factors.T
    return heldout_ranks(scores, train, users, items)


def evaluate(user_factors: np.ndarray, item_factors: np.ndarray, train: sp.csr_matrix,
             users: np.ndarray, items: np.ndarray, k: int,
             ranks: np.ndarray | None = None) -> dict:
    """The version's scores, the most-popular baseline's, and the number of users; `ranks`:
    the version's factor_ranks when already computed."""
    if ranks is None:
        ranks = factor_ranks(user_factors, item_factors, train, users, items)
    model = ranking_metrics(ranks, k)
    popular = ranking_metrics(popular_ranks(train, users, items), k)
    return {**model, **{f"popular_{name}": value for name, value in popular.items()},
            "eval_users": len(users), "k": k}


def compare_with_parent(candidate: tuple[np.ndarray, np.ndarray],
                        parent: tuple[np.ndarray, np.ndarray], known_user: np.ndarray,
                        train: sp.csr_matrix, users: np.ndarray, items: np.ndarray,
                        k: int, candidate_ranks: np.ndarray | None = None) -> dict:
    """Candidate and parent on the same held-out pairs: those of users the parent knows.

    The parent never trained on these pairs: each is its user's latest appreciation, which
    the parent either held out too or had not seen yet. `parent` holds its factors placed
    in the candidate's rows (zeros for users and projects it did not have)."""
    common = known_user[users]
    result = {}
    for name, (user_factors, item_factors) in (("candidate", candidate), ("parent", parent)):
        if name == "candidate" and candidate_ranks is not None:  # the same pairs, scored
            ranks = candidate_ranks[common]
        else:
            ranks = factor_ranks(user_factors, item_factors, train, users[common],
                                 items[common])
        result.update({f"{name}_{key}": value
                       for key, value in ranking_metrics(ranks, k).items()})
    result["compared_users"] = int(common.sum())
    return result
