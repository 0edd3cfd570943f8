import numpy as np
import pytest

from services.evaluate.metrics import (
    linear_probe,
    map_at_k,
    recall_at_k,
    stratified_split,
    user_profiles,
)


def _unit(degrees):
    angles = np.radians(degrees)
    return np.stack([np.cos(angles), np.sin(angles)], 1)


# Five items at these angles (cosine ranks by angle difference; no ties).
ANGLES = [0, 10, 25, 45, 85]
LABELS = ["A", "A", "B", "A", "B"]


def test_map_at_2_on_a_hand_computed_example():
    # q0: 1(+) 2(-) -> 1/min(2, 2) = 0.5     q1: 0(+) 2(-) -> 0.5
    # q2: 1(-) 3(-) -> 0                      q3: 2(-) 1(+) -> (1/2)/2 = 0.25
    # q4: 3(-) 2(+) -> (1/2)/min(2, 1) = 0.5  mean: 1.75 / 5
    assert map_at_k(_unit(ANGLES), LABELS, k=2) == pytest.approx(0.35)


def test_map_at_3_counts_precision_at_each_hit():
    # q0: 1(+) 2(-) 3(+) -> (1 + 2/3)/2     q1: 0(+) 2(-) 3(+) -> (1 + 2/3)/2
    # q2: 1 3 0 all A -> 0                   q3: 2(-) 1(+) 4(-) -> (1/2)/2
    # q4: 3(-) 2(+) 1(-) -> (1/2)/1
    expected = (2 * (1 + 2 / 3) / 2 + 0.25 + 0.5) / 5
    assert map_at_k(_unit(ANGLES), LABELS, k=3) == pytest.approx(expected)


def test_map_at_k_perfect_and_skips_singletons():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], dtype=np.float32)
    assert map_at_k(x, ["a", "a", "b", "b", "c"], k=10) == pytest.approx(1.0)


def test_linear_probe_separable_and_deterministic():
    rng = np.random.default_rng(0)
    labels = np.repeat(["x", "y", "z"], 30)
    centres = {"x": [3, 0, 0], "y": [0, 3, 0], "z": [0, 0, 3]}
    features = np.array([centres[label] for label in labels]) + rng.normal(0, 0.5, (90, 3))
    assert linear_probe(features, labels, seed=1) == 1.0
    noise = rng.normal(size=(90, 3))
    first = linear_probe(noise, labels, seed=2)
    assert first == linear_probe(noise, labels, seed=2)
    assert first < 0.7


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2)
    train, test = stratified_split(labels, 0.3, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(15))
    assert set(labels[train]) == set(labels[test]) == {0, 1, 2}


def test_recall_at_k_hand_computed_with_exclusion():
    items = np.eye(4, dtype=np.float32)
    users = np.array([[4, 3, 2, 1], [1, 2, 3, 4], [1, 1, 1, 1]], dtype=np.float32)
    held_out = [[1, 3], [0], []]
    # User 0: item 0 excluded -> top-2 = 1, 2 -> 1 hit of min(2, 2) = 0.5.
    # User 1: top-2 = 3, 2 -> 0 hits of min(2, 1) = 0. User 2 has nothing held out.
    assert recall_at_k(users, items, held_out, k=2, exclude=[[0], [], []]) == 0.25
    assert recall_at_k(users, items, held_out, k=4) == pytest.approx((1 + 1) / 2)


def test_user_profiles_average_normalized_items():
    items = np.array([[2, 0], [0, 3], [1, 1]], dtype=np.float32)
    profiles = user_profiles(items, [[0, 1], [], [2]])
    np.testing.assert_allclose(profiles[0], [0.5, 0.5])
    np.testing.assert_allclose(profiles[1], [0, 0])
    np.testing.assert_allclose(profiles[2], [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
