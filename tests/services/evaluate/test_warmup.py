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


def test_warm_vectors_are_ranked_as_served():
    """A candidate without interactions is served its unit image vector, whatever length
    the CNN gave it; one with interactions its fold-in at its length over the prior's.
    Ranked by inner product as served, an unwarmed project with a long CNN output must
    not outrank the warmed ones by that length alone."""
    rng = np.random.default_rng(3)
    users, items = rng.normal(size=(50, 4)), rng.normal(size=(80, 4))
    params = fold.WarmParams(weights=(1.0, 4.0, 2.0, 0.0), alpha=4.0, eps=1.0,
                             regularization=0.05, strength=0.3)
    space = fold.space(users, items, params.regularization)
    cnn = rng.normal(size=(3, 4)) * np.array([[100.0], [0.01], [1.0]])
    seen = events([1, 1, 1], [4, 5, 6], [fold.APPRECIATE] * 3)
    known = np.ones(3, dtype=bool)
    warm = warmup.warm_vectors(cnn, seen, np.array([4, 5, 6]), known, space, params)
    served = fold.served(warm, space)
    for row in (0, 2):
        assert np.allclose(served[row], cnn[row] / np.linalg.norm(cnn[row]), atol=1e-6)
    rows, sums = fold.pair_sums(np.array([4, 5, 6]), np.full(3, fold.APPRECIATE),
                                params.weights)
    assert np.allclose(warm[1], fold.fold_in(cnn[1], rows, sums, space, params))
