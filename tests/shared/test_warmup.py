"""The warm-up fold-in as plain functions: the prior at 0 interactions, the behavioural
factor as they accumulate, the refresh's confidence weighting."""

from __future__ import annotations

import numpy as np
import pytest

from shared.warmup import (
    APPRECIATE,
    VIEW,
    WarmParams,
    behavioural,
    confidence,
    fold_in,
    pair_sums,
    space,
)

PARAMS = WarmParams(weights=(1.0, 4.0, 4.0, 8.0), alpha=4.0, eps=1.0, regularization=0.05,
                    strength=1.0)
K = 8


def world(seed: int = 0, users: int = 400):
    """User factors, item factors and a hidden item: users whose factor scores high on it
    are the ones who interact."""
    rng = np.random.default_rng(seed)
    user_factors = rng.normal(size=(users, K)) * 0.3
    item_factors = rng.normal(size=(200, K)) * 0.5
    hidden = rng.normal(size=K)
    affinity = user_factors @ hidden
    fans = np.argsort(-affinity)  # the likeliest users first
    return space(user_factors, item_factors, PARAMS.regularization), hidden, fans, rng


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_no_interactions_is_the_prior_exactly():
    sp, _, _, rng = world()
    prior = rng.normal(size=K)
    out = fold_in(prior, np.empty(0, np.int64), np.empty(0), sp, PARAMS)
    assert cosine(out, prior) == pytest.approx(1.0, abs=1e-12)
    assert np.linalg.norm(out) == pytest.approx(sp.prior_norm)


def test_prior_length_is_the_median_item_factor_norm():
    sp, _, _, _ = world()
    rng = np.random.default_rng(0)
    rng.normal(size=(400, K))
    items = rng.normal(size=(200, K)) * 0.5
    assert space(sp.user_factors, items, 0.05).prior_norm == pytest.approx(
        float(np.median(np.linalg.norm(items, axis=1))))


def test_more_interactions_move_towards_the_behavioural_factor():
    """A prior unrelated to what users do: as the project's fans arrive, the warm-up
    vector leaves the prior and closes in on the factor their interactions imply."""
    sp, hidden, fans, rng = world(seed=1)
    prior = rng.normal(size=K)  # the CNN got it wrong
    target = behavioural(fans[:200], np.full(200, 4.0), sp, PARAMS)
    seen = []
    for n in (0, 1, 3, 10, 30, 100, 200):
        rows, sums = fans[:n], np.full(n, 4.0)
        seen.append(cosine(fold_in(prior, rows, sums, sp, PARAMS), target))
    assert seen == sorted(seen)
    assert seen[0] < 0.5 < 0.95 < seen[-1]
    assert cosine(fold_in(prior, fans[:200], np.full(200, 4.0), sp, PARAMS), hidden) > 0.8


def test_distance_to_its_own_behavioural_factor_shrinks():
    """With every interaction seen so far, the gap to ALS's solve on the same interactions
    is (strength G + D)^-1 strength G m: it shrinks as D grows."""
    sp, _, fans, rng = world(seed=2)
    prior = rng.normal(size=K)
    gaps = []
    for n in (1, 10, 100, 400):
        rows, sums = fans[:n], np.full(n, 4.0)
        warm, behaviour = (fold_in(prior, rows, sums, sp, PARAMS),
                           behavioural(rows, sums, sp, PARAMS))
        gaps.append(np.linalg.norm(warm - behaviour))
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < gaps[0] / 4


def test_the_gap_to_als_is_the_prior_seen_through_the_data():
    """strength 1: warm - behavioural = (G + D)^-1 G m exactly, the prior's pull."""
    sp, _, fans, rng = world(seed=3)
    prior = rng.normal(size=K)
    rows, sums = fans[:20], np.linspace(1, 9, 20)
    y, c = sp.user_factors[rows], confidence(sums, PARAMS.alpha, PARAMS.eps)
    m = prior * sp.prior_norm / np.linalg.norm(prior)
    pull = np.linalg.solve(sp.gram + (y.T * (c - 1.0)) @ y, sp.gram @ m)
    np.testing.assert_allclose(fold_in(prior, rows, sums, sp, PARAMS)
                               - behavioural(rows, sums, sp, PARAMS), pull, rtol=1e-5,
                               atol=1e-9)


def test_stronger_prior_stays_closer_to_the_cnn():
    sp, _, fans, rng = world(seed=4)
    prior = rng.normal(size=K)
    rows, sums = fans[:10], np.full(10, 4.0)
    near = [cosine(fold_in(prior, rows, sums, sp,
                           WarmParams(**{**PARAMS.__dict__, "strength": s})), prior)
            for s in (0.1, 1.0, 10.0)]
    assert near == sorted(near)


def test_one_solve_matches_the_normal_equations_of_the_objective():
    """The solution minimises sum_obs c(1 - y.x)^2 - (y.x)^2 + (x - m)' s G (x - m)."""
    sp, _, fans, rng = world(seed=5)
    prior = rng.normal(size=K)
    rows, sums = fans[:7], np.arange(1.0, 8.0)
    x = fold_in(prior, rows, sums, sp, PARAMS)
    m = prior * sp.prior_norm / np.linalg.norm(prior)
    y, c = sp.user_factors[rows], confidence(sums, PARAMS.alpha, PARAMS.eps)

    def loss(v):
        s = y @ v
        return float(np.sum(c * (1 - s) ** 2 - s ** 2) + (v - m) @ sp.gram @ (v - m))

    for _ in range(20):
        assert loss(x) <= loss(x + rng.normal(size=K) * 1e-3)


def test_confidence_and_weights_are_the_refresh_ones():
    from services.refresh.factors import matrix

    sums = np.array([0.5, 1.0, 4.0, 40.0], dtype=np.float32)
    np.testing.assert_array_equal(confidence(sums, 4.0, 1.0), matrix.confidence(sums, 4.0, 1.0))
    rows, summed = pair_sums(np.array([3, 3, 5, 7]), np.array([VIEW, APPRECIATE, VIEW, VIEW]),
                             (1.0, 4.0, 4.0, 8.0))
    assert rows.tolist() == [3, 5, 7] and summed.tolist() == [5.0, 1.0, 1.0]
    rows, _ = pair_sums(np.array([1, 2]), np.array([VIEW, APPRECIATE]), (0.0, 4.0, 4.0, 8.0))
    assert rows.tolist() == [2]  # a zero weight adds no pair


def test_bad_input_is_a_clear_error():
    sp, _, _, _ = world()
    with pytest.raises(ValueError, match="all zeros"):
        fold_in(np.zeros(K), np.empty(0, np.int64), np.empty(0), sp, PARAMS)
    with pytest.raises(ValueError, match="must be 8 finite"):
        fold_in(np.ones(K + 1), np.empty(0, np.int64), np.empty(0), sp, PARAMS)
    with pytest.raises(ValueError, match="unknown interaction type"):
        pair_sums(np.array([1]), np.array([9]), PARAMS.weights)
    with pytest.raises(ValueError, match="do not match"):
        space(np.ones((3, K)), np.ones((3, K + 1)), 0.05)
