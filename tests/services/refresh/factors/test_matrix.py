import numpy as np
import psycopg
import pytest
import scipy.sparse as sp

from services.refresh.factors.matrix import MatrixParams, build_training, choose_heldout
from services.refresh.factors.pairs import from_rows
from services.refresh.factors.read import read_pairs
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
        return from_rows(read_pairs(conn, _params().weights))


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
    hu, hi = choose_heldout(data, params)
    pairs = sorted(zip(data.user_ids[hu].tolist(), data.item_ids[hi].tolist(), strict=True))
    assert pairs == [(1, 12), (2, 11)]  # user 3 appreciated nothing; user 4 has one project
    training = build_training(data, params)
    dense_users, dense_items, dense = _dense(training, data)
    for user, item in pairs:  # held-out pairs are not trained on
        if user in dense_users and item in dense_items:
            assert dense[dense_users.index(user), dense_items.index(item)] == 0


def _random_pairs(rng, n_events: int, users: int, items: int, seq_start: int = 0):
    """Pairs of random events as a full read would give them, and the events."""
    from services.refresh.factors.read import NewEvents, PairRows

    events = NewEvents(rng.integers(1, users, n_events) * 3, rng.integers(1, items, n_events),
                       rng.choice(4, n_events, p=[0.6, 0.3, 0.05, 0.05]).astype(np.int8),
                       np.arange(seq_start, seq_start + n_events), "snap", n_events)
    key = events.user_id * 10**6 + events.project_id
    distinct, inverse = np.unique(key, return_inverse=True)
    weights = np.array([1.0, 4.0, 4.0, 8.0])[events.type]
    sums = np.bincount(inverse, weights=weights).astype(np.float32)
    app = events.type == 1
    rows = PairRows(distinct // 10**6, distinct % 10**6, sums, events.seq[app],
                    events.user_id[app], events.project_id[app], "snap", n_events)
    return from_rows(rows), events


def _reference_changes(current, pairs, previous, old):
    """The whole-matrix diff: both matrices embedded in the current pairs' index space."""
    def embed(training, source):
        coo = training.matrix.tocoo()
        rows = np.searchsorted(pairs.user_ids, source.user_ids[training.user_rows[coo.row]])
        cols = np.searchsorted(pairs.item_ids, source.item_ids[training.item_cols[coo.col]])
        return sp.csr_matrix((coo.data, (rows, cols)), shape=pairs.shape)

    diff = embed(current, pairs) - embed(previous, old)
    diff.data[np.abs(diff.data) < 1e-5] = 0
    diff.eliminate_zeros()
    users = np.flatnonzero(np.diff(diff.indptr))
    items = np.unique(diff.indices)
    # Rows and columns of the current matrix only (one that left it has nothing to solve).
    return (np.flatnonzero(np.isin(current.user_rows, users)),
            np.flatnonzero(np.isin(current.item_cols, items)), diff.nnz)


@pytest.mark.parametrize("seed", range(6))
def test_changed_rows_match_a_whole_matrix_diff(seed):
    from services.refresh.factors.matrix import changes
    from services.refresh.factors.pairs import add_events

    rng = np.random.default_rng(seed)
    params = _params(filter_min_user_count=3, filter_min_item_count=3, filter_top_user_pct=5,
                     filter_top_item_pct=5, eval_fraction=0.4)
    old, _ = _random_pairs(rng, 3000, 120, 200)
    previous = build_training(old, params)
    # New events from a few users, some of them new users and new projects.
    _, more = _random_pairs(rng, 300 + 100 * seed, 140, 230, seq_start=10_000)
    few = np.isin(more.user_id, rng.choice(np.unique(more.user_id), 15, replace=False))
    for name in ("user_id", "project_id", "type", "seq"):
        setattr(more, name, getattr(more, name)[few])
    pairs, touched = add_events(old, more, params.weights)
    current = build_training(pairs, params)
    change = changes(current, pairs, previous.state(old), old, touched, params)
    users, items, nnz = _reference_changes(current, pairs, previous, old)
    assert change.users.tolist() == users.tolist()
    assert change.items.tolist() == items.tolist()
    assert change.changed_nnz == nnz > 0
    # Rows without new events changed too (filter thresholds, the top cut, held-out pairs).
    changed = set(pairs.user_ids[current.user_rows[change.users]].tolist())
    assert changed - set(pairs.user_ids[touched].tolist())


def test_events_added_to_pairs_equal_pairs_of_all_events():
    from services.refresh.factors.pairs import add_events
    from services.refresh.factors.read import NewEvents

    rng = np.random.default_rng(7)
    _, events = _random_pairs(rng, 4000, 90, 150)
    whole, _ = _random_pairs(np.random.default_rng(7), 4000, 90, 150)
    cut = 3100
    first = NewEvents(*(getattr(events, n)[:cut] for n in ("user_id", "project_id", "type",
                                                             "seq")), "a", cut)
    rest = NewEvents(*(getattr(events, n)[cut:] for n in ("user_id", "project_id", "type",
                                                            "seq")), "b", 4000)
    empty = from_rows(PairRowsEmpty())
    part, _ = add_events(empty, first, _params().weights)
    merged, touched = add_events(part, rest, _params().weights)
    assert np.array_equal(merged.user_ids, whole.user_ids)
    assert np.array_equal(merged.item_ids, whole.item_ids)
    assert (merged.sums != whole.sums).nnz == 0
    assert np.array_equal(merged.latest_item, whole.latest_item)
    assert np.array_equal(merged.latest_seq, whole.latest_seq)
    assert set(merged.user_ids[touched]) == set(rest.user_id)


def PairRowsEmpty():  # noqa: N802 (reads like the class it builds)
    from services.refresh.factors.read import PairRows

    empty = np.zeros(0, np.int64)
    return PairRows(empty, empty, np.zeros(0, np.float32), empty, empty, empty, "", 0)


def test_popular_ranks_equal_ranking_every_project_by_its_users():
    from services.refresh.factors.quality import heldout_ranks, popular_ranks

    rng = np.random.default_rng(3)
    train = sp.random(60, 40, density=0.2, format="csr", random_state=rng)
    users = np.arange(60)
    items = rng.integers(0, 40, 60)
    train = train.tolil()
    train[users, items] = 0  # the held-out project is never in training
    train = train.tocsr()
    train.eliminate_zeros()
    popularity = np.bincount(train.indices, minlength=40).astype(np.float32)

    def scores(batch):
        return np.broadcast_to(popularity, (len(batch), 40)).copy()

    assert popular_ranks(train, users, items).tolist() == heldout_ranks(
        scores, train, users, items).tolist()
