import threading

import psycopg

from services.refresh.factors.pairs import from_rows
from services.refresh.factors.read import any_new_since, read_new_events, read_pairs
from shared.db.store import write_batch
from shared.events import Interaction, InteractionType, ProjectEvent
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
    conn.commit()
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


def _events(prefix: str, n: int, users: int = 4, projects: int = 5):
    return [Interaction(f"{prefix}{k}", InteractionType(k % 3), 1 + k % users,
                        10 + k % projects, 1_735_689_600_000 + k) for k in range(n)]


def test_folds_count_every_event_once_through_replays_and_ownership(db_url):
    events = _events("r", 40)
    with psycopg.connect(db_url) as conn:
        write_batch(conn, events, [], "g", {})
        once = read_pairs(conn, WEIGHTS)
        assert once.folded == 20
        write_batch(conn, events[10:] + events[:5], [], "g", {})  # a replay: nothing new
        again = read_pairs(conn, WEIGHTS)
        assert again.folded == 0
        assert _as_dicts(from_rows(once)) == _as_dicts(from_rows(again)) == _expected(conn)
        # New events on known and new pairs, and an owner's pair from a publish event.
        write_batch(conn, _events("s", 30, users=6), [ProjectEvent(
            "p1", "published", 10, 1, "/x.png", 1_735_689_600_000)], "g", {})
        third = read_pairs(conn, WEIGHTS)
        assert third.folded > 0
        assert _as_dicts(from_rows(third)) == _expected(conn)
        counts = conn.execute("SELECT sum(views + appreciations + comments + owns) "
                              "FROM interaction_pairs").fetchone()[0]
        assert counts == conn.execute("SELECT count(*) FROM interactions").fetchone()[0] == 71
        conn.commit()


def test_concurrent_ingest_during_folds_loses_and_repeats_nothing(db_url):
    stop = threading.Event()
    errors = []

    def ingest():
        try:
            with psycopg.connect(db_url) as conn:
                for round_ in range(40):
                    write_batch(conn, _events(f"c{round_}-", 100, users=7, projects=9),
                                [], "g", {})
        except Exception as error:  # reported below
            errors.append(repr(error))
        finally:
            stop.set()

    thread = threading.Thread(target=ingest)
    thread.start()
    with psycopg.connect(db_url) as conn:
        reads = 0
        while not stop.is_set() or reads == 0:
            read_pairs(conn, WEIGHTS)
            reads += 1
        thread.join(60)
        final = from_rows(read_pairs(conn, WEIGHTS))
        assert errors == [] and reads >= 2
        assert _as_dicts(final) == _expected(conn)


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
        folded = read_pairs(first, WEIGHTS)  # the late event is folded in, once
        assert sorted(folded.user_id.tolist()) == [7, 8] and folded.folded == 1
        assert _as_dicts(from_rows(folded)) == _expected(first)
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
