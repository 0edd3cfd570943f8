"""services/evaluate/warmup.py: the curve's popularity baseline, without servers."""

from __future__ import annotations

import numpy as np

from services.evaluate import warmup
from shared import warmup as fold


def events(position, user, kind) -> warmup.Events:
    position = np.asarray(position, dtype=np.int64)
    return warmup.Events(np.asarray(user, dtype=np.int64), position,
                         np.asarray(kind, dtype=np.int64), warmup.ranks(position))


def test_popularity_counts_appreciators_then_viewers_and_ties_fall_by_a_coin():
    # Ten projects seen once each: nine views, one appreciation (project 5); project 7
    # is viewed a second time, by another user, so it leads the viewed ones.
    seen = events([*range(10), 7], [*range(10), 11], [fold.VIEW] * 5 + [fold.APPRECIATE]
                  + [fold.VIEW] * 5)
    known = np.ones(11, dtype=bool)
    ranks = warmup.popularity(seen, known, 10)
    order = list(np.argsort(-ranks))
    assert order[:2] == [5, 7]
    tied = order[2:]
    # Left to the sort, the tied ones would come in catalog (publication) order.
    assert sorted(tied) != tied and sorted(tied) != tied[::-1]
    assert sorted(ranks.tolist()) == list(range(10))
    assert np.array_equal(warmup.popularity(seen, known, 10), ranks)  # seeded
