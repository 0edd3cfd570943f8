"""The realism check: is the world neither trivial nor hopeless?

Density before and after the paper's popularity filtering, activity and popularity tails,
how much of appreciation is explained by style versus content, and how far colour
statistics alone get on style (they should not solve it).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from services.simulate.behaviour import APPRECIATE, VIEW, Chunk
from services.simulate.world import World
from shared.filtering import filter_popularity

PERCENTILES = (10, 50, 90, 99, 100)
# Behance, for comparison (the paper): raw and after filtering, in percent.
BEHANCE = {"appreciations": (0.0013, 0.03), "views": (0.0091, 0.16)}


def collect(chunks) -> Chunk:
    """All chunks' interactions in one (in-memory; for tiny and small worlds)."""
    chunks = list(chunks)
    join = [np.concatenate([getattr(c, name) for c in chunks]) for name in
            ("ts", "user", "project", "kind", "project_ts", "project_index", "project_kind")]
    return Chunk(-1, chunks[0].start_ms, chunks[-1].end_ms, *join)


def pair_matrix(world: World, chunk: Chunk, kind: int) -> sp.csr_matrix:
    pick = chunk.kind == kind
    data = np.ones(int(pick.sum()), dtype=np.float32)
    shape = (world.config.users, world.config.projects)
    matrix = sp.csr_matrix((data, (chunk.user[pick], chunk.project[pick])), shape=shape)
    matrix.sum_duplicates()
    return matrix


def density_report(world: World, chunk: Chunk, min_count: int, top_pct: float) -> dict:
    views = pair_matrix(world, chunk, VIEW)
    appreciations = pair_matrix(world, chunk, APPRECIATE)
    kept = filter_popularity(appreciations, min_user_count=min_count, min_item_count=min_count,
                             top_user_pct=top_pct, top_item_pct=top_pct)
    rows, cols = kept.rows, kept.cols
    return {
        "filter": {"min_count": min_count, "top_pct": top_pct,
                   "users": len(rows), "projects": len(cols),
                   "iterations": kept.stats["iterations"]},
        "appreciations": _density_pair(appreciations, rows, cols),
        "views": _density_pair(views, rows, cols),
    }


def _density_pair(matrix: sp.csr_matrix, rows, cols) -> dict:
    block = matrix[rows][:, cols] if len(rows) and len(cols) else sp.csr_matrix((0, 0))
    cells = max(1, block.shape[0] * block.shape[1])
    return {"raw_pct": 100 * matrix.nnz / (matrix.shape[0] * matrix.shape[1]),
            "filtered_pct": 100 * block.nnz / cells,
            "kept_share": block.nnz / max(1, matrix.nnz)}


def tails(world: World, chunk: Chunk) -> dict:
    per_user = np.bincount(chunk.user, minlength=world.config.users)
    views = chunk.kind == VIEW
    per_project = np.bincount(chunk.project[views], minlength=world.config.projects)
    return {"interactions_per_user": _percentiles(per_user),
            "top1pct_users_share": _top_share(per_user),
            "views_per_project": _percentiles(per_project),
            "top1pct_projects_share": _top_share(per_project),
            "users_without_interactions": int((per_user == 0).sum()),
            "cold_projects": int((np.bincount(chunk.project, minlength=world.config.projects)
                                  == 0).sum())}


def _percentiles(counts: np.ndarray) -> dict:
    return {f"p{p}": float(np.percentile(counts, p)) for p in PERCENTILES}


def _top_share(counts: np.ndarray) -> float:
    top = max(1, len(counts) // 100)
    return float(np.sort(counts)[-top:].sum() / max(1, counts.sum()))


def taste_signal(world: World, chunk: Chunk) -> dict:
    """Share of viewed (user, project) pairs that are appreciated, split by whether the user
    likes the project's style or its category."""
    width = np.int64(world.config.projects)
    viewed = np.unique(chunk.user[chunk.kind == VIEW] * width + chunk.project[chunk.kind == VIEW])
    liked = chunk.user[chunk.kind == APPRECIATE] * width + chunk.project[chunk.kind == APPRECIATE]
    appreciated = np.isin(viewed, liked)
    user, project = np.divmod(viewed, width)
    style_score = world.style_pref[user, world.style[project]]
    category_score = world.category_pref[user, world.category[project]]
    return {"appreciation_rate": float(appreciated.mean()),
            "style": _lift(appreciated, style_score > 0)
            | {"auc": _auc(style_score, appreciated)},
            "category": _lift(appreciated, category_score > 0)
            | {"auc": _auc(category_score, appreciated)}}


def _lift(outcome: np.ndarray, preferred: np.ndarray) -> dict:
    hit = float(outcome[preferred].mean()) if preferred.any() else 0.0
    miss = float(outcome[~preferred].mean()) if (~preferred).any() else 0.0
    return {"rate_preferred": hit, "rate_other": miss, "lift": hit / miss if miss else 0.0,
            "share_of_pairs": float(preferred.mean())}


def _auc(score: np.ndarray, outcome: np.ndarray) -> float:
    """Probability that an appreciated view scores above a non-appreciated one (ties half)."""
    positives, negatives = int(outcome.sum()), int((~outcome).sum())
    if not positives or not negatives:
        return 0.5
    ranks = rankdata(score)
    return float((ranks[outcome].sum() - positives * (positives + 1) / 2)
                 / (positives * negatives))


def colour_baseline(world: World, n: int = 480, size: int = 64) -> dict:
    """Nearest-centroid accuracy from colour statistics alone, on half of n rendered images,
    and from grey-level structure statistics alone for comparison.

    In the palette world colour is well above chance on style; in the structure world it
    should be near chance while structure is not."""
    from services.simulate.render import render_image

    n = min(n, world.config.projects)
    pixels = [render_image(world, j, size) for j in range(n)]
    colour = np.stack([colour_features(p) for p in pixels])
    structure = np.stack([structure_features(p) for p in pixels])
    half = n // 2
    labels = [("style", world.style[:n], world.config.n_styles),
              ("category", world.category[:n], world.config.n_categories)]
    if world.styles.n_palettes:
        labels.insert(1, ("palette", world.styles.palette[world.style[:n]],
                          world.styles.n_palettes))

    def score(features, y, classes):
        return {"accuracy": nearest_centroid(features[:half], y[:half], features[half:],
                                             y[half:]), "chance": 1 / classes}

    out = {name: score(colour, y, classes) for name, y, classes in labels}
    out["style from structure"] = score(structure, world.style[:n], world.config.n_styles)
    return out


def structure_features(pixels: np.ndarray, rings: int = 12) -> np.ndarray:
    """Colour-blind texture statistics: the radial power spectrum of the contrast-
    normalized grey image (texture scale) and a gradient orientation histogram."""
    gray = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = (gray - gray.mean()) / (gray.std() + 1e-3)
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray))) ** 2
    size = gray.shape[0]
    y, x = np.indices(power.shape) - size // 2
    ring = np.minimum((np.hypot(x, y) / (size / 2) * rings).astype(int), rings)
    spectrum = np.bincount(ring.ravel(), power.ravel(), minlength=rings + 1)[1:rings + 1]
    gy, gx = np.gradient(gray)
    angle = ((np.arctan2(gy, gx) % np.pi) / np.pi * 8).astype(int) % 8
    orientation = np.bincount(angle.ravel(), np.hypot(gx, gy).ravel(), minlength=8)
    return np.concatenate([np.log1p(spectrum / spectrum.sum() * 100),
                           orientation / max(orientation.sum(), 1e-6)])


def colour_features(pixels: np.ndarray) -> np.ndarray:
    """Per-channel mean and spread plus a 4x4x4 colour histogram."""
    flat = pixels.reshape(-1, 3).astype(np.float32) / 255
    bins = np.minimum((flat * 4).astype(int), 3)
    histogram = np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64)
    return np.concatenate([flat.mean(0), flat.std(0), histogram / len(flat)])


def nearest_centroid(train, train_labels, test, test_labels) -> float:
    classes = np.unique(train_labels)
    centroids = np.stack([train[train_labels == c].mean(0) for c in classes])
    distance = ((test[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[distance.argmin(1)] == test_labels).mean())


def report(world: World, chunk: Chunk, min_count: int = 5, top_pct: float = 0.5,
           pixels: bool = True) -> dict:
    counts = np.bincount(chunk.kind, minlength=3)
    out = {"users": world.config.users, "projects": world.config.projects,
           "views": int(counts[0]), "appreciations": int(counts[1]), "comments": int(counts[2]),
           "project_events": len(chunk.project_ts),
           "density": density_report(world, chunk, min_count, top_pct),
           "tails": tails(world, chunk), "taste": taste_signal(world, chunk)}
    if pixels:
        out["colour_baseline"] = colour_baseline(world)
    return out


def format_report(stats: dict) -> str:
    d, t, s = stats["density"], stats["tails"], stats["taste"]
    lines = [
        f"world: {stats['users']:,} users, {stats['projects']:,} projects; "
        f"{stats['views']:,} views, {stats['appreciations']:,} appreciations, "
        f"{stats['comments']:,} comments, {stats['project_events']:,} project events",
        f"filter (appreciations, min {d['filter']['min_count']}, top {d['filter']['top_pct']}%): "
        f"{d['filter']['users']:,} users x {d['filter']['projects']:,} projects kept "
        f"({d['filter']['iterations']} passes)",
    ]
    for name in ("appreciations", "views"):
        raw, after = BEHANCE[name]
        lines.append(f"density {name}: {d[name]['raw_pct']:.4f}% raw, "
                     f"{d[name]['filtered_pct']:.4f}% filtered ({d[name]['kept_share']:.0%} "
                     f"kept); Behance {raw}% / {after}%")
    lines += [
        f"interactions per user: {_fmt(t['interactions_per_user'])}; top 1% of users make "
        f"{t['top1pct_users_share']:.0%}; {t['users_without_interactions']:,} users idle",
        f"views per project: {_fmt(t['views_per_project'])}; top 1% of projects get "
        f"{t['top1pct_projects_share']:.0%}; {t['cold_projects']:,} projects cold (no "
        "interactions)",
        f"viewed (user, project) pairs appreciated: {s['appreciation_rate']:.3f}",
    ]
    for name in ("style", "category"):
        x = s[name]
        lines.append(f"  {name} preferred: {x['rate_preferred']:.3f} vs {x['rate_other']:.3f} "
                     f"otherwise (lift {x['lift']:.2f}, AUC {x['auc']:.3f}; "
                     f"{x['share_of_pairs']:.0%} of viewed pairs)")
    for name, x in stats.get("colour_baseline", {}).items():
        kind = name if name.startswith("style from") else f"colour statistics -> {name}"
        lines.append(f"nearest centroid, {kind}: {x['accuracy']:.2f} "
                     f"(chance {x['chance']:.2f})")
    return "\n".join(lines)


def _fmt(percentiles: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in percentiles.items())
