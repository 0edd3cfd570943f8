"""Metrics that compare feature sets: retrieval mAP@k, a linear probe, recall@K.

Plain functions over numpy arrays; torch does the heavy lifting in chunks so a few hundred
thousand items fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 2048


def map_at_k(features: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean average precision of the top-k cosine neighbours, every item a query.

    The query itself is left out. AP@k = sum over hits at rank i of precision@i, divided
    by min(k, number of other items with the query's label); queries whose label no
    other item has are skipped.
    """
    x = F.normalize(torch.as_tensor(np.asarray(features, dtype=np.float32)), dim=1)
    y = torch.as_tensor(np.unique(np.asarray(labels), return_inverse=True)[1].ravel())
    k = min(k, len(x) - 1)
    relevant_total = torch.bincount(y)[y] - 1
    ranks = torch.arange(1, k + 1, dtype=torch.float32)
    aps = []
    for start in range(0, len(x), CHUNK):
        sims = x[start:start + CHUNK] @ x.T
        own = torch.arange(start, start + len(sims))
        sims[torch.arange(len(sims)), own] = -float("inf")
        top = sims.topk(k, dim=1).indices
        hits = (y[top] == y[own][:, None]).float()
        precision = hits.cumsum(1) / ranks
        denom = relevant_total[own].clamp(max=k).float()
        aps.append(((precision * hits).sum(1) / denom.clamp_min(1))[denom > 0])
    return torch.cat(aps).mean().item()


def linear_probe(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.3,
                 seed: int = 0, weight_decay: float = 1e-3, max_iter: int = 200) -> float:
    """Test accuracy of multinomial logistic regression on a stratified split.

    Features are standardized on the training part; L-BFGS from zero weights on the full
    batch, so the result is deterministic for a seed.
    """
    x = np.asarray(features, dtype=np.float32)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    train_idx, test_idx = stratified_split(y.ravel(), test_fraction, seed)
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0) + 1e-6
    xt = torch.as_tensor((x - mean) / std)
    yt = torch.as_tensor(y.ravel(), dtype=torch.long)
    layer = torch.nn.Linear(x.shape[1], len(classes))
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=max_iter,
                                  line_search_fn="strong_wolfe")
    train_x, train_y = xt[train_idx], yt[train_idx]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(train_x), train_y) + \
            weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = layer(xt[test_idx]).argmax(1)
    return (predicted == yt[test_idx]).float().mean().item()


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a `test_fraction` share (at least one when the class has two or more)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def user_profiles(item_vectors: np.ndarray, user_items: Sequence[Sequence[int]]) -> np.ndarray:
    """A user's vector: the mean of the normalized vectors of the items they engaged with."""
    items = F.normalize(torch.as_tensor(np.asarray(item_vectors, dtype=np.float32)), dim=1)
    out = torch.zeros(len(user_items), items.shape[1])
    for user, seen in enumerate(user_items):
        if len(seen):
            out[user] = items[torch.as_tensor(np.asarray(seen, dtype=np.int64))].mean(0)
    return out.numpy()


def recall_at_k(user_vectors: np.ndarray, item_vectors: np.ndarray,
                held_out: Sequence[Sequence[int]], k: int = 10,
                exclude: Sequence[Sequence[int]] | None = None) -> float:
    """Mean over users with held-out items of |top-k ∩ held-out| / min(k, |held-out|).

    Items are ranked by dot product; `exclude` (typically the user's training items) can
    never be recommended.
    """
    users = torch.as_tensor(np.asarray(user_vectors, dtype=np.float32))
    items = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32))
    k = min(k, len(items))
    recalls = []
    for start in range(0, len(users), CHUNK):
        scores = users[start:start + CHUNK] @ items.T
        for row in range(len(scores)):
            user = start + row
            if exclude is not None and len(exclude[user]):
                scores[row, torch.as_tensor(np.asarray(exclude[user], dtype=np.int64))] = \
                    -float("inf")
        top = scores.topk(k, dim=1).indices.numpy()
        for row in range(len(scores)):
            held = np.asarray(held_out[start + row], dtype=np.int64)
            if len(held):
                hits = np.isin(top[row], held).sum()
                recalls.append(hits / min(k, len(held)))
    return float(np.mean(recalls)) if recalls else float("nan")
