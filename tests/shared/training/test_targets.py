import numpy as np
import pytest

from shared.training.targets import assign, kmeans, make_targets, normalize_rows


def test_normalize_rows_flags_zero_factors():
    normed, usable = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]))
    np.testing.assert_allclose(normed[0], [0.6, 0.8], rtol=1e-6)
    assert usable.tolist() == [True, False, True]
    assert normed.dtype == np.float32


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[5, 0], [0, 5], [-5, -5]], dtype=np.float32)
    labels = np.repeat(np.arange(3), 50)
    return centres[labels] + rng.normal(0, 0.3, (150, 2)), labels


def test_kmeans_recovers_separated_clusters_deterministically():
    points, truth = _blobs()
    centroids, labels = kmeans(points, 3, seed=1)
    again = kmeans(points, 3, seed=1)
    np.testing.assert_array_equal(labels, again[1])
    np.testing.assert_array_equal(centroids, again[0])
    # Same partition as the truth, whatever the cluster numbering.
    for cluster in range(3):
        assert len(set(truth[labels == cluster])) == 1
    np.testing.assert_array_equal(assign(points, centroids), labels)


def test_kmeans_from_parent_centroids_keeps_class_ids():
    points, _ = _blobs()
    centroids, labels = kmeans(points, 3, seed=1)
    moved, _ = _blobs(seed=5)
    order = [2, 0, 1]
    _, again = kmeans(moved, 3, seed=9, init=centroids[order])
    np.testing.assert_array_equal(np.array(order)[again], labels)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError):
        kmeans(np.zeros((2, 2)), 3)


def test_pseudo_class_targets_leave_rows_without_factor_out():
    points, _ = _blobs()
    factors = np.vstack([points, np.zeros((1, 2))])
    targets = make_targets(factors, mode="pseudo-class", k=3, seed=0)
    assert targets.out_dim == 3 and targets.values[-1] == -1
    assert set(targets.values[:-1]) == {0, 1, 2}
    assert targets.centroids.shape == (3, 2)
    regress = make_targets(factors)
    assert regress.out_dim == 2 and not regress.usable[-1]
