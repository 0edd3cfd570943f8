"""What the CNN learns to predict, made from ALS item factors.

`regress`: the L2-normalized factor itself (direction carries taste; norm mostly carries
popularity, which an image cannot predict). `pseudo-class`: the K-means cluster of the
normalized factor, as in the arXiv version of Fang et al. 2015.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("regress", "pseudo-class")


@dataclass
class Targets:
    mode: str
    values: np.ndarray  # float32 N x d (regress) or int64 N (pseudo-class)
    usable: np.ndarray  # bool N: rows whose factor is not (near) zero
    centroids: np.ndarray | None = None  # float32 k x d (pseudo-class)

    @property
    def out_dim(self) -> int:
        return len(self.centroids) if self.mode == "pseudo-class" else self.values.shape[1]


def normalize_rows(factors: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length rows, and a mask of the rows that had a usable (non-zero) norm."""
    factors = np.asarray(factors, dtype=np.float32)
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    usable = norms[:, 0] > eps
    return factors / np.maximum(norms, eps), usable


def make_targets(factors: np.ndarray, mode: str = "regress", k: int = 64, seed: int = 0,
                 iters: int = 50, init: np.ndarray | None = None) -> Targets:
    """`init`: the parent model's centroids when fine-tuning, so class ids keep their
    meaning across refreshes (a fresh K-means would permute them under the head)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    normed, usable = normalize_rows(factors)
    if mode == "regress":
        return Targets(mode, normed, usable)
    centroids, labels = kmeans(normed[usable], k, seed=seed, iters=iters, init=init)
    all_labels = np.full(len(normed), -1, dtype=np.int64)  # -1: no factor, never trained
    all_labels[usable] = labels
    return Targets(mode, all_labels, usable, centroids)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50, chunk: int = 65536,
           init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's K-means from `init` or k-means++; deterministic for a seed. Returns
    (centroids, labels). An emptied cluster is re-seeded with the farthest point."""
    data = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if k > len(data):
        raise ValueError(f"k={k} exceeds the {len(data)} points")
    if init is not None:
        centroids = torch.as_tensor(np.asarray(init, dtype=np.float32)).clone()
        if centroids.shape != (k, data.shape[1]):
            raise ValueError(f"init has shape {tuple(centroids.shape)}, not {(k, data.shape[1])}")
    else:
        centroids = _kmeans_pp(data, k, torch.Generator().manual_seed(seed))
    labels = torch.full((len(data),), -1, dtype=torch.long)
    for _ in range(iters):
        new_labels, dist = _assign(data, centroids, chunk)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        centroids = _update(data, labels, dist, centroids)
    return centroids.numpy(), labels.numpy()


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest-centroid labels for new points (e.g. projects added after clustering)."""
    data = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return _assign(data, torch.as_tensor(centroids), 65536)[0].numpy()


def _kmeans_pp(data: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    first = torch.randint(len(data), (1,), generator=gen).item()
    centroids = [data[first]]
    closest = ((data - data[first]) ** 2).sum(1)
    for _ in range(1, k):
        if closest.sum() <= 0:  # fewer distinct points than k: pick any remaining
            pick = torch.randint(len(data), (1,), generator=gen).item()
        else:
            pick = torch.multinomial(closest, 1, generator=gen).item()
        centroids.append(data[pick])
        closest = torch.minimum(closest, ((data - data[pick]) ** 2).sum(1))
    return torch.stack(centroids)


def _assign(data: torch.Tensor, centroids: torch.Tensor,
            chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Chunked so N x k distances never sit in memory at once (423k x 1000 would be 1.7 GB).
    labels, dists = [], []
    c_sq = (centroids ** 2).sum(1)
    for start in range(0, len(data), chunk):
        block = data[start:start + chunk]
        d = (block ** 2).sum(1, keepdim=True) - 2 * block @ centroids.T + c_sq
        dist, label = d.min(1)
        labels.append(label)
        dists.append(dist.clamp_min(0))
    return torch.cat(labels), torch.cat(dists)


def _update(data: torch.Tensor, labels: torch.Tensor, dist: torch.Tensor,
            old: torch.Tensor) -> torch.Tensor:
    k = len(old)
    sums = torch.zeros_like(old).index_add_(0, labels, data)
    counts = torch.bincount(labels, minlength=k).float()
    centroids = sums / counts.clamp_min(1).unsqueeze(1)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        far = torch.argsort(dist, descending=True, stable=True)[:len(empty)]
        centroids[empty] = data[far]
    return centroids
