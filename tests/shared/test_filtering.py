import numpy as np
import scipy.sparse as sp

from shared.filtering import filter_popularity

# Rows are users, columns items. Distinct non-zero counts:
#   users: u0=5 u1=3 u2=2 u3=2 u4=1 u5=0      items: i0=4 i1=3 i2=2 i3=2 i4=2
DENSE = np.array([
    [1, 2, 1, 1, 1],  # u0: the most active user
    [1, 1, 0, 0, 3],  # u1
    [1, 1, 0, 0, 0],  # u2
    [1, 0, 1, 0, 0],  # u3
    [0, 0, 0, 5, 0],  # u4
    [0, 0, 0, 0, 0],  # u5: no interactions
], dtype=np.float32)


def test_hand_computed_example():
    # top 20% of 6 users = 1 user (u0); top 20% of 5 items = 1 item (i0).
    # Without u0 and i0: user counts u1=2 (i1,i4) u2=1 u3=1 u4=1 u5=0 -> keep u1 only.
    # Then item counts over {u1}: i1=1 i2=0 i3=0 i4=1 -> keep i1, i4.
    # Then u1 still has 2 -> stable.
    result = filter_popularity(sp.csr_matrix(DENSE), min_user_count=2, min_item_count=1,
                               top_user_pct=20, top_item_pct=20)
    assert result.rows.tolist() == [1]
    assert result.cols.tolist() == [1, 4]
    assert result.rows.dtype == np.int64 and result.cols.dtype == np.int64
    stats = result.stats
    assert stats["shape_before"] == (6, 5) and stats["nnz_before"] == 13
    assert stats["shape_after"] == (1, 2) and stats["nnz_after"] == 2
    assert stats["density_before"] == 13 / 30 and stats["density_after"] == 1.0
    assert stats["iterations"] == 2  # one pass that changes things, one that confirms


def test_iterates_until_stable():
    # No top cut. min 2 each way: u4 (1) and u5 (0) go; then i3 has only u0 -> goes;
    # i2 keeps u0 and u3; u0 keeps 4 items... all remaining users still have >= 2.
    result = filter_popularity(sp.csr_matrix(DENSE), min_user_count=2, min_item_count=2,
                               top_user_pct=0, top_item_pct=0)
    assert result.rows.tolist() == [0, 1, 2, 3]
    assert result.cols.tolist() == [0, 1, 2, 4]
    # Raising the item minimum to 3 cascades: i2 (u0,u3) and i4 (u0,u1) go, so u3 keeps
    # only i0 and goes too; i0 (u0,u1,u2) and i1 (u0,u1,u2) survive.
    result = filter_popularity(sp.csr_matrix(DENSE), min_user_count=2, min_item_count=3,
                               top_user_pct=0, top_item_pct=0)
    assert result.rows.tolist() == [0, 1, 2]
    assert result.cols.tolist() == [0, 1]
    assert result.stats["iterations"] >= 3


def test_counts_distinct_entries_not_weights():
    # Duplicated coordinates and explicit zeros must not inflate counts.
    rows = np.array([0, 0, 0, 1, 1])
    cols = np.array([0, 0, 1, 0, 1])
    data = np.array([1.0, 1.0, 0.0, 1.0, 1.0])
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(2, 2))
    result = filter_popularity(matrix, min_user_count=2, min_item_count=1,
                               top_user_pct=0, top_item_pct=0)
    assert result.rows.tolist() == [1]
    assert result.stats["nnz_before"] == 3


def test_everything_filtered_out():
    result = filter_popularity(sp.csr_matrix(DENSE), min_user_count=10, min_item_count=1,
                               top_user_pct=0, top_item_pct=0)
    assert len(result.rows) == 0 and len(result.cols) == 0
    assert result.stats["density_after"] == 0.0
