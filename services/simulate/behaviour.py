"""Behaviour over simulated time: exposure, views, appreciations, comments, project events.

Time is cut into chunks. In a chunk, users only see projects published before the chunk
began, so a project's `published` event always precedes interactions with it, and
projects published during the last chunk stay cold (no interactions at all). Only one
chunk's events are in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from services.simulate.world import World

VIEW, APPRECIATE, COMMENT = 0, 1, 2
PUBLISHED, UPDATED, DELETED = 0, 1, 2
PROJECT_KINDS = ("published", "updated", "deleted")
INTERACTION_KINDS = ("view", "appreciate", "comment")

# Where a view comes from: the popular feed, a random browse, or a taste-matched suggestion.
EXPOSURE = (0.45, 0.20, 0.35)
# Appreciation log-odds: style dominates, category helps a little, and invisible quality
# plus per-user generosity add noise that no image can explain.
BASE_LOGIT, STYLE_WEIGHT, CATEGORY_WEIGHT, QUALITY_WEIGHT = -3.0, 3.0, 0.8, 0.5
COMMENT_AFTER_APPRECIATION, COMMENT_AFTER_VIEW = 0.08, 0.005


@dataclass
class Chunk:
    index: int
    start_ms: int
    end_ms: int
    # interactions, sorted by time; user and project are indices (id = index + 1)
    ts: np.ndarray
    user: np.ndarray
    project: np.ndarray
    kind: np.ndarray
    # project events, sorted by time
    project_ts: np.ndarray
    project_index: np.ndarray
    project_kind: np.ndarray

    def __len__(self) -> int:
        return len(self.ts) + len(self.project_ts)


class Sampler:
    """Precomputed cumulative weights so each chunk's sampling is a few searchsorted calls."""

    def __init__(self, world: World):
        self.world = world
        self.user_cum = np.cumsum(world.activity)
        self.popular_cum = np.cumsum(world.popularity)
        self.taste_cum = np.cumsum(world.style_pref, axis=1)
        self.members = [np.flatnonzero(world.style == s) for s in range(world.config.n_styles)]
        self.member_cum = [np.cumsum(world.popularity[m]) for m in self.members]

    def users(self, rng, n: int) -> np.ndarray:
        draw = rng.random(n) * self.user_cum[-1]
        return np.minimum(np.searchsorted(self.user_cum, draw), len(self.user_cum) - 1)

    def projects(self, rng, users: np.ndarray, available: int) -> np.ndarray:
        """One exposed project per view among the first `available` (published) projects."""
        n = len(users)
        mode = rng.choice(3, size=n, p=EXPOSURE)
        chosen = rng.integers(0, available, n)  # random browse, also the fallback
        popular = mode == 0
        chosen[popular] = _weighted_prefix(rng, self.popular_cum, available, popular.sum())
        taste = np.flatnonzero(mode == 2)
        styles = self._liked_styles(rng, users[taste])
        for style, members in enumerate(self.members):
            rows = taste[styles == style]
            count = np.searchsorted(members, available)  # published members of this style
            if len(rows) and count:
                picks = _weighted_prefix(rng, self.member_cum[style], count, len(rows))
                chosen[rows] = members[picks]
        return chosen

    def _liked_styles(self, rng, users: np.ndarray) -> np.ndarray:
        cum = self.taste_cum[users]
        draw = rng.random(len(users)) * cum[:, -1]
        return (cum < draw[:, None]).sum(axis=1)


def _weighted_prefix(rng, cum: np.ndarray, prefix: int, n: int) -> np.ndarray:
    """n draws from the first `prefix` items, proportional to their weights."""
    draw = rng.random(n) * cum[prefix - 1]
    return np.minimum(np.searchsorted(cum, draw, side="right"), prefix - 1)


def appreciation_probability(world: World, user: np.ndarray, project: np.ndarray):
    logit = (BASE_LOGIT + world.user_bias[user]
             + STYLE_WEIGHT * world.style_pref[user, world.style[project]]
             + CATEGORY_WEIGHT * world.category_pref[user, world.category[project]]
             + QUALITY_WEIGHT * world.quality[project])
    return 1.0 / (1.0 + np.exp(-logit))


def generate(world: World, max_chunks: int | None = None) -> Iterator[Chunk]:
    """Chunks in simulated-time order; the interaction count approaches config.events."""
    config = world.config
    sampler = Sampler(world)
    bounds = np.linspace(world.start_ms, world.end_ms, config.chunks + 1).astype(np.int64)
    made, ratio = 0, 1.2  # ratio: interactions per view, refined as chunks come out
    views_seen = 0
    for c in range(config.chunks if max_chunks is None else min(max_chunks, config.chunks)):
        rng = np.random.default_rng([config.seed, 3, c])
        budget = (config.events - made) / (config.chunks - c)
        chunk = _chunk(world, sampler, rng, c, int(bounds[c]), int(bounds[c + 1]),
                       views=max(0, round(budget / ratio)))
        made += len(chunk.ts)
        views_seen += int((chunk.kind == VIEW).sum())
        if views_seen:
            ratio = made / views_seen
        yield chunk


def _chunk(world: World, sampler: Sampler, rng, index: int, start: int, end: int,
           views: int) -> Chunk:
    available = int(np.searchsorted(world.publish_ms, start))
    if available == 0:
        views = 0
    user = sampler.users(rng, views)
    project = sampler.projects(rng, user, available) if views else user.copy()
    ts = rng.integers(start, end, views)
    ts, user, project, kind = _reactions(world, rng, ts, user, project, end)
    # No interaction with a project after it was deleted.
    deleted = world.delete_ms[project]
    alive = (deleted < 0) | (ts < deleted)
    order = np.argsort(ts[alive], kind="stable")
    p_ts, p_index, p_kind = _project_events(world, index, start, end)
    return Chunk(index, start, end, ts[alive][order], user[alive][order],
                 project[alive][order], kind[alive][order], p_ts, p_index, p_kind)


def _reactions(world: World, rng, ts, user, project, end: int):
    """Views, plus appreciations and comments that follow some of them."""
    p = appreciation_probability(world, user, project)
    appreciated = rng.random(len(p)) < p
    comment_p = np.where(appreciated, COMMENT_AFTER_APPRECIATION, COMMENT_AFTER_VIEW)
    commented = rng.random(len(p)) < comment_p
    # Reactions come seconds to minutes after the view, within the chunk.
    appreciate_ts = np.minimum(ts + rng.exponential(30_000, len(ts)).astype(np.int64), end - 1)
    comment_ts = np.minimum(appreciate_ts + rng.exponential(120_000, len(ts)).astype(np.int64),
                            end - 1)
    parts = [(ts, user, project, VIEW),
             (appreciate_ts[appreciated], user[appreciated], project[appreciated], APPRECIATE),
             (comment_ts[commented], user[commented], project[commented], COMMENT)]
    return (np.concatenate([part[0] for part in parts]),
            np.concatenate([part[1] for part in parts]),
            np.concatenate([part[2] for part in parts]),
            np.concatenate([np.full(len(part[0]), part[3], np.int8) for part in parts]))


def _project_events(world: World, index: int, start: int, end: int):
    # The first chunk also carries the catalogue published before simulated time began.
    low = np.iinfo(np.int64).min if index == 0 else start
    columns = [world.publish_ms, world.update_ms, world.delete_ms]
    ts, which, kind = [], [], []
    for k, column in enumerate(columns):
        # -1 marks "never" in the update and delete columns.
        hit = np.flatnonzero((column >= 0) & (column >= low) & (column < end))
        ts.append(column[hit])
        which.append(hit)
        kind.append(np.full(len(hit), k, np.int8))
    ts, which, kind = np.concatenate(ts), np.concatenate(which), np.concatenate(kind)
    order = np.argsort(ts, kind="stable")  # published first on equal times
    return ts[order], which[order], kind[order]
