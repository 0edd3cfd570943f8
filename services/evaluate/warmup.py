"""The warm-up curve: user_recall@20 on new projects after each has been seen N times.

For every N in SEEN, each new project's first N interactions (any type, by seq) are what
is known; the appreciations after them are what to predict. Three rankings of the same
candidates for the same users:

- cnn-only: the collaborative CNN's vector (what a new project is served without warm-up);
- warm-up: that vector with the N interactions folded in (shared/warmup.py), ranked as
  served: by inner product at its length over the prior's (`metric="cosine"` ranks it by
  direction only, for comparison);
- popularity: distinct appreciating users among the N interactions, viewers then a seeded
  coin breaking ties (undefined at N = 0: every project is tied).

A user counts at N when they appreciate a new project after its first N interactions and
had no interaction with it among them; projects a user touched among the seen ones are
never recommended to them. docs/evaluation.md#warm-up has the protocol and the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.evaluate.metrics import recall_at_k
from shared import warmup as fold
from shared.factors import Factors

SEEN = (0, 1, 3, 10, 30)
TASK = "user_recall@20 warm-up"
CNN, WARM, POPULARITY = "cnn-only", "warm-up", "popularity"
SOURCES = (CNN, WARM, POPULARITY)
K = 20


@dataclass
class Events:
    """Interactions on the candidates, in seq order, with each one's rank on its project."""

    user: np.ndarray
    position: np.ndarray  # index into the candidates
    type: np.ndarray
    rank: np.ndarray  # 0 for a project's first interaction, 1 for its second, ...


def read_events(conn, candidates: np.ndarray) -> Events:
    rows = conn.execute(
        "SELECT user_id, project_id, type FROM interactions WHERE project_id = ANY(%s) "
        "ORDER BY seq", (candidates.tolist(),)).fetchall()
    conn.commit()
    data = np.array(rows, dtype=np.int64).reshape(-1, 3)
    position = np.searchsorted(candidates, data[:, 1])
    return Events(data[:, 0], position, data[:, 2], ranks(position))


def ranks(position: np.ndarray) -> np.ndarray:
    """How many earlier events (in array order) share each event's project."""
    order = np.argsort(position, kind="stable")
    sorted_pos = position[order]
    starts = np.flatnonzero(np.r_[True, sorted_pos[1:] != sorted_pos[:-1]])
    counts = np.diff(np.r_[starts, len(sorted_pos)])
    within = np.arange(len(sorted_pos)) - np.repeat(starts, counts)
    out = np.empty(len(position), dtype=np.int64)
    out[order] = within
    return out


def curve(conn, candidates: np.ndarray, cnn_vectors: np.ndarray, factors: Factors,
          params: fold.WarmParams, seen: tuple[int, ...] = SEEN,
          metric: str = "ip") -> list[dict]:
    """Result rows (task, features, seen, score, n) for every N and source.
    `candidates`: the new projects' ids, sorted; `cnn_vectors`: their CNN vectors."""
    if metric not in ("ip", "cosine"):
        raise ValueError(f"metric must be ip or cosine, not {metric!r}")
    events = read_events(conn, candidates)
    space = fold.space(factors.user_factors, factors.item_factors, params.regularization)
    users = factors.user_rows(events.user)
    out = []
    for n in seen:
        known = events.rank < n
        targets, exclude, who = _targets(events, users, known)
        if not len(who):
            continue
        user_vectors = factors.user_factors[who]
        warm = warm_vectors(cnn_vectors, events, users, known, space, params)
        warm = fold.served(warm, space) if metric == "ip" else _unit(warm)
        scores = {CNN: recall_at_k(user_vectors, _unit(cnn_vectors), targets, K, exclude),
                  WARM: recall_at_k(user_vectors, warm, targets, K, exclude)}
        if n > 0:
            popular = popularity(events, known, len(candidates))
            scores[POPULARITY] = recall_at_k(np.ones((len(who), 1)), popular[:, None],
                                             targets, K, exclude)
        out += [{"task": TASK, "features": source, "seen": n, "score": float(score),
                 "n": len(who)} for source, score in scores.items()]
    return out


def _targets(events: Events, users: np.ndarray,
             known: np.ndarray) -> tuple[list, list, np.ndarray]:
    """Per user row with a factor: candidate positions to predict and to exclude."""
    has = users >= 0
    touched = {(u, p) for u, p in zip(users[known & has].tolist(),
                                      events.position[known & has].tolist(), strict=True)}
    later = has & ~known & (events.type == fold.APPRECIATE)
    wanted: dict[int, set[int]] = {}
    for u, p in zip(users[later].tolist(), events.position[later].tolist(), strict=True):
        if (u, p) not in touched:
            wanted.setdefault(u, set()).add(p)
    who = np.array(sorted(wanted), dtype=np.int64)
    seen_by: dict[int, list[int]] = {}
    for u, p in touched:
        seen_by.setdefault(u, []).append(p)
    return ([sorted(wanted[u]) for u in who.tolist()],
            [seen_by.get(u, []) for u in who.tolist()], who)


def warm_vectors(cnn_vectors: np.ndarray, events: Events, users: np.ndarray,
                 known: np.ndarray, space: fold.Space, params: fold.WarmParams) -> np.ndarray:
    """Each candidate's fold-in of its known interactions by users with factors; one
    without any is its CNN vector, centred as served (by its unit image vector)."""
    out = np.stack([fold.centred(v, space) for v in np.asarray(cnn_vectors)])
    pick = known & (users >= 0)
    order = np.argsort(events.position[pick], kind="stable")
    position, rows = events.position[pick][order], users[pick][order]
    types = events.type[pick][order]
    bounds = np.flatnonzero(np.r_[True, position[1:] != position[:-1], True]) if len(
        position) else np.array([0])
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        user_rows, sums = fold.pair_sums(rows[start:end], types[start:end], params.weights)
        out[position[start]] = fold.fold_in(out[position[start]], user_rows, sums, space,
                                            params)
    return out


def popularity(events: Events, known: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Each candidate's rank (higher: more popular) by distinct appreciating users among
    the known interactions, then distinct viewers, then a seeded coin. With every project
    seen exactly N times most are tied; left to the sort, ties would fall in catalog
    order, which is publication order: popularity would be handed the projects' age."""
    def distinct(mask: np.ndarray) -> np.ndarray:
        pairs = np.unique(np.stack([events.position[mask], events.user[mask]]), axis=1)
        return np.bincount(pairs[0], minlength=count)

    appreciations = distinct(known & (events.type == fold.APPRECIATE))
    views = distinct(known & (events.type == fold.VIEW))
    coin = np.random.default_rng(seed).random(count)
    order = np.lexsort((coin, views, appreciations))  # the last key sorts first
    ranks = np.empty(count, dtype=np.float64)
    ranks[order] = np.arange(count)
    return ranks


def _unit(x: np.ndarray) -> np.ndarray:
    # The projects collection ranks by cosine: the image vectors' lengths do not count.
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


# -- the report -----------------------------------------------------------------------


def markdown(results: list[dict]) -> str:
    rows = [r for r in results if r["task"] == TASK]
    if not rows:
        return ""
    cells = {(r["seen"], r["features"]): r for r in rows}
    seen = sorted({r["seen"] for r in rows})
    lines = ["| interactions seen | " + " | ".join(SOURCES) + " | users |",
             "|---" * (len(SOURCES) + 2) + "|"]
    for n in seen:
        values = [_cell(cells.get((n, s))) for s in SOURCES]
        users = next(cells[n, s]["n"] for s in SOURCES if (n, s) in cells)
        lines.append(f"| {n} | " + " | ".join(values) + f" | {users} |")
    return ("## New projects warming up: user_recall@20 by interactions seen\n\n"
            + "\n".join(lines) + "\n")


def _cell(row: dict | None) -> str:
    if row is None:
        return "–"
    return "nan" if math.isnan(row["score"]) else f"{row['score']:.3f}"


def plot(path: Path, results: list[dict]) -> Path | None:
    rows = [r for r in results if r["task"] == TASK]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 3.4))
    for source in SOURCES:
        points = sorted((r["seen"], r["score"]) for r in rows if r["features"] == source)
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=source)
    axis.set_xscale("symlog", linthresh=1)
    axis.set_xlabel("interactions seen per new project")
    axis.set_ylabel("user_recall@20")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
