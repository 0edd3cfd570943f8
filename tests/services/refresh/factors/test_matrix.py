import numpy as np
import psycopg
import pytest

from services.refresh.factors.matrix import MatrixParams, build_training, choose_heldout
from services.refresh.factors.read import read_interactions
from shared.db.store import write_batch
from shared.events import Interaction, InteractionType
from shared.settings import Settings

V, A, C = InteractionType.view, InteractionType.appreciate, InteractionType.comment
# user, project, type, in ingestion order
EVENTS = [(1, 11, V), (1, 11, V), (1, 12, A), (1, 13, V),
          (2, 11, A), (2, 12, V),
          (3, 11, V), (3, 12, V), (3, 13, C),
          (4, 14, V)]


def _load(db_url):
    rows = [Interaction(f"m{n}", kind, user, project, 1_735_689_600_000 + n)
            for n, (user, project, kind) in enumerate(EVENTS)]
    with psycopg.connect(db_url) as conn:
        write_batch(conn, rows, [], "g", {})
        return read_interactions(conn, None)


def _params(**overrides) -> MatrixParams:
    values = dict(als_alpha=1.0, als_eps=1.0, filter_min_user_count=2,
                  filter_min_item_count=2, filter_top_user_pct=0, filter_top_item_pct=0,
                  eval_fraction=1e-12)
    settings = Settings(**{**values, **overrides})
    return MatrixParams.from_settings(settings)


def _dense(training, data):
    users = data.user_ids[training.user_rows].tolist()
    items = data.item_ids[training.item_cols].tolist()
    return users, items, training.matrix.toarray()


def test_weights_log_scaling_and_filtering_by_hand(db_url):
    data = _load(db_url)
    training = build_training(data, _params())
    users, items, dense = _dense(training, data)
    # User 4 and project 14 have one interaction each: below both minimums.
    assert (users, items) == ([1, 2, 3], [11, 12, 13])
    c = lambda total: 1 + np.log1p(total)  # noqa: E731 (weights: view 1, appreciate 4, comment 4)
    expected = [[c(2), c(4), c(1)], [c(4), c(1), 0], [c(1), c(1), c(4)]]
    assert dense == pytest.approx(np.array(expected, dtype=np.float32), rel=1e-6)
    stats = training.stats
    assert (stats["shape_before"], stats["nnz_before"]) == ([4, 4], 9)
    assert (stats["shape_after"], stats["nnz_after"]) == ([3, 3], 8)
    assert stats["density_after"] == pytest.approx(8 / 9)


def test_most_popular_project_is_dropped_first(db_url):
    data = _load(db_url)
    # 25% of 4 projects: project 11 (3 users) goes; then user 2 keeps one project only.
    users, items, _ = _dense(build_training(data, _params(filter_top_item_pct=25)), data)
    assert (users, items) == ([1, 3], [12, 13])


def test_heldout_is_each_sampled_users_latest_appreciation(db_url):
    data = _load(db_url)
    params = _params(eval_fraction=1.0)
    rows = np.arange(data.n_rows)
    from services.refresh.factors.matrix import weight_sums

    hu, hi = choose_heldout(data, rows, weight_sums(data, rows, params), params)
    pairs = sorted(zip(data.user_ids[hu].tolist(), data.item_ids[hi].tolist(), strict=True))
    assert pairs == [(1, 12), (2, 11)]  # user 3 appreciated nothing; user 4 has one project
    training = build_training(data, params)
    dense_users, dense_items, dense = _dense(training, data)
    for user, item in pairs:  # held-out pairs are not trained on
        if user in dense_users and item in dense_items:
            assert dense[dense_users.index(user), dense_items.index(item)] == 0
