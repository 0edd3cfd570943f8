import numpy as np
import pytest

from services.refresh.factors import align


def test_rotation_is_recovered_and_scores_are_unchanged():
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(50, 8)), rng.normal(size=(80, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    ids = np.arange(80) * 3
    # The "new" version is the old one in a rotated frame, plus one new project.
    new_ids = np.r_[ids, 1000]
    new_items = np.r_[items @ rotation, rng.normal(size=(1, 8))].astype(np.float32)
    new_users = (users @ rotation).astype(np.float32)
    fitted = align.fit_rotation(ids, items.astype(np.float32), new_ids, new_items)
    aligned_users, aligned_items = align.apply(fitted, new_users, new_items)
    assert fitted.shared == 80
    assert fitted.error_before > 0.5 and fitted.error_after < 1e-5
    assert np.allclose(aligned_items[:80], items, atol=1e-4)
    assert np.allclose(aligned_users @ aligned_items.T, new_users @ new_items.T, atol=1e-4)


def test_incremental_versions_keep_the_identity():
    items = np.eye(3, dtype=np.float32)
    fitted = align.fit_rotation(np.arange(3), items, np.arange(3), items * 2, rotate=False)
    assert np.array_equal(fitted.rotation, np.eye(3))
    assert fitted.error_before == pytest.approx(1.0)
