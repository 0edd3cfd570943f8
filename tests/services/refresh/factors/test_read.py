import psycopg

from services.refresh.factors.pairs import from_rows
from services.refresh.factors.read import any_new_since, read_new_events, read_pairs
from shared.db.store import write_batch
from shared.events import Interaction, InteractionType
from tests.services.refresh.factors.synth import store_events, taste_world

WEIGHTS = (1.0, 4.0, 4.0, 8.0)


def _expected(conn) -> dict:
    """Weighted sums per pair and each user's latest appreciation, from the raw events."""
    sums = dict(conn.execute(
        "SELECT (user_id, project_id)::text, sum(CASE type WHEN 0 THEN 1 WHEN 3 THEN 8 "
        "ELSE 4 END) FROM interactions GROUP BY user_id, project_id").fetchall())
    latest = dict(conn.execute(
        "SELECT DISTINCT ON (user_id) user_id, project_id FROM interactions WHERE type = 1 "
        "ORDER BY user_id, seq DESC").fetchall())
    return {"sums": {key: float(value) for key, value in sums.items()}, "latest": latest}


def _as_dicts(pairs) -> dict:
    coo = pairs.sums.tocoo()
    sums = {f"({pairs.user_ids[u]},{pairs.item_ids[i]})": float(v)
            for u, i, v in zip(coo.row, coo.col, coo.data, strict=True)}
    has = pairs.latest_item >= 0
    latest = dict(zip(pairs.user_ids[has].tolist(),
                      pairs.item_ids[pairs.latest_item[has]].tolist(), strict=True))
    return {"sums": sums, "latest": latest}


def test_pairs_match_the_events(db_url, monkeypatch):
    from services.refresh.factors import read

    monkeypatch.setattr(read, "BLOCK_RANGE", 3)  # many block ranges, the last one open
    with psycopg.connect(db_url) as conn:
        empty = read_pairs(conn, WEIGHTS)
        assert (len(empty.sum), empty.watermark) == (0, 0)
        store_events(conn, taste_world(50, 60, 2000, seed=3))
        rows = read_pairs(conn, WEIGHTS)
        expected = _expected(conn)
        top = conn.execute("SELECT max(seq) FROM interactions").fetchone()[0]
    pairs = from_rows(rows)
    assert _as_dicts(pairs) == expected
    assert rows.watermark == top and len(rows.sum) == len(expected["sums"])


def test_a_replayed_batch_counts_once(db_url):
    events = [Interaction(f"r{n}", InteractionType(n % 3), 1 + n % 4, 10 + n % 5,
                          1_735_689_600_000 + n) for n in range(40)]
    with psycopg.connect(db_url) as conn:
        write_batch(conn, events, [], "g", {})
        once = _as_dicts(from_rows(read_pairs(conn, WEIGHTS)))
        write_batch(conn, events[10:] + events[:5], [], "g", {})
        again = _as_dicts(from_rows(read_pairs(conn, WEIGHTS)))
        assert once == again == _expected(conn)


def _event(n, user=7, project=70):
    return Interaction(f"x{n}", InteractionType.appreciate, user, project, 1_735_689_600_000)


def test_rows_committed_out_of_seq_order_are_new_exactly_once(db_url):
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as late:
        write_batch(first, [_event(0)], [], "g", {})
        # `late` takes a lower seq but commits after the snapshot below was taken.
        late.execute("INSERT INTO interactions (event_id, user_id, project_id, type, ts) "
                     "VALUES ('late', 8, 80, 0, now())")
        write_batch(first, [_event(1)], [], "g", {})
        before = read_pairs(first, WEIGHTS)
        assert sorted(before.user_id.tolist()) == [7]
        assert not any_new_since(first, before.snapshot)
        late.commit()
        assert any_new_since(first, before.snapshot)
        after = read_new_events(first, before.snapshot)
        again = read_new_events(first, after.snapshot)
    assert after.user_id.tolist() == [8] and after.type.tolist() == [0]
    assert after.seq[0] < before.watermark  # lower seq, still seen as new
    assert len(again) == 0 and after.watermark == before.watermark


def test_dense_index_of_small_and_sparse_ids():
    import numpy as np

    from services.refresh.factors.read import dense_index

    for ids in (np.array([5, 3, 5, 9, 3]), np.array([10**15, 7, 10**15, -4, 7])):
        values, index = dense_index(ids)
        assert values.tolist() == sorted(set(ids.tolist()))
        assert values[index].tolist() == ids.tolist()
