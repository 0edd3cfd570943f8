"""A synthetic taste world for factorization tests and benchmarks: users love a few of k
styles, every project has one style and a popularity; events follow taste x popularity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.events import Interaction, InteractionType

USER_BASE = 1_000
ITEM_BASE = 500_000
T0_MS = 1_735_689_600_000


@dataclass
class Events:
    user: np.ndarray  # user ids
    item: np.ndarray  # project ids
    type: np.ndarray  # InteractionType codes

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows) -> Events:
        return Events(self.user[rows], self.item[rows], self.type[rows])


@dataclass
class TasteWorld:
    taste: np.ndarray  # users x styles, rows sum to 1
    style: np.ndarray  # style of each project
    popularity: np.ndarray  # per project
    activity: np.ndarray  # per user
    user_base: int
    item_base: int

    def sample(self, events: int, rng: np.random.Generator, users: np.ndarray | None = None,
               chunk: int = 2_000_000) -> Events:
        """Events by taste x popularity; `users` (indices) restricts who acts."""
        parts = [self._sample(min(chunk, events - start), rng, users)
                 for start in range(0, events, chunk)]
        return Events(*(np.concatenate([getattr(p, name) for p in parts]) if parts
                        else np.zeros(0, np.int64) for name in ("user", "item", "type")))

    def _sample(self, events: int, rng, users) -> Events:
        pool = np.arange(len(self.activity)) if users is None else np.asarray(users)
        weight = self.activity[pool]
        user = pool[rng.choice(len(pool), size=events, p=weight / weight.sum())]
        styles = self.taste.shape[1]
        chosen = (rng.random(events)[:, None] > np.cumsum(self.taste, axis=1)[user]).sum(axis=1)
        item = _pick_items(rng, self.style, self.popularity, np.minimum(chosen, styles - 1),
                           styles)
        kind = rng.choice([InteractionType.view, InteractionType.appreciate,
                           InteractionType.comment], size=events, p=[0.7, 0.25, 0.05])
        return Events(user.astype(np.int64) + self.user_base,
                      item.astype(np.int64) + self.item_base, kind.astype(np.int8))


def make_world(users: int, items: int, styles: int = 8, seed: int = 0,
               user_base: int = USER_BASE, item_base: int = ITEM_BASE) -> TasteWorld:
    rng = np.random.default_rng(seed)
    return TasteWorld(taste=rng.dirichlet(np.full(styles, 0.2), size=users),
                      style=rng.integers(0, styles, size=items),
                      popularity=rng.pareto(1.5, size=items) + 1.0,
                      activity=rng.lognormal(0.0, 0.8, size=users),
                      user_base=user_base, item_base=item_base)


def taste_world(users: int, items: int, events: int, styles: int = 8, seed: int = 0) -> Events:
    world = make_world(users, items, styles, seed)
    return world.sample(events, np.random.default_rng(seed + 1))


def _pick_items(rng, style, popularity, chosen_style, styles) -> np.ndarray:
    """Within the chosen style, a project with probability proportional to popularity."""
    order = np.argsort(style, kind="stable")
    cum = np.zeros(len(order))
    for s in range(styles):
        block = style[order] == s
        share = np.cumsum(popularity[order[block]])
        if len(share):
            cum[block] = s + share / share[-1]
    position = np.searchsorted(cum, chosen_style + rng.random(len(chosen_style)))
    return order[np.minimum(position, len(order) - 1)]


def as_interactions(events: Events, prefix: str = "e", start: int = 0) -> list[Interaction]:
    return [Interaction(f"{prefix}{start + n}", InteractionType(int(t)), int(u), int(i),
                        T0_MS + start + n)
            for n, (u, i, t) in enumerate(zip(events.user, events.item, events.type,
                                              strict=True))]


def store_events(conn, events: Events, prefix: str = "e", start: int = 0,
                 batch: int = 50_000) -> None:
    """Write through the real store path (shared.db.store.write_batch)."""
    from shared.db.store import write_batch

    rows = as_interactions(events, prefix, start)
    for offset in range(0, len(rows), batch):
        write_batch(conn, rows[offset:offset + batch], [], "test", {})


def pairs_of(events: Events, weights=(1.0, 4.0, 4.0, 8.0), seq_start: int = 0):
    """The Pairs a full read of a store holding exactly `events` (in this order) gives."""
    from services.refresh.factors.pairs import from_rows
    from services.refresh.factors.read import PairRows

    seq = np.arange(seq_start, seq_start + len(events), dtype=np.int64)
    key = events.user.astype(np.int64) * (1 << 32) + events.item
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]] if len(ordered) else np.zeros(0, bool)
    group = np.cumsum(first) - 1
    sums = np.bincount(group, weights=np.asarray(weights)[events.type[order]],
                       minlength=int(first.sum())).astype(np.float32)
    liked = events.type == InteractionType.appreciate
    rows = PairRows(ordered[first] >> 32, ordered[first] & 0xFFFFFFFF, sums, seq[liked],
                    events.user[liked].astype(np.int64), events.item[liked].astype(np.int64),
                    "in-memory", int(seq[-1]) if len(seq) else 0)
    return from_rows(rows)


def new_events(events: Events, seq_start: int):
    from services.refresh.factors.read import NewEvents

    seq = np.arange(seq_start, seq_start + len(events), dtype=np.int64)
    return NewEvents(events.user.astype(np.int64), events.item.astype(np.int64),
                     events.type.astype(np.int8), seq, "in-memory",
                     int(seq[-1]) if len(seq) else 0)
