import numpy as np
import psycopg

from services.refresh.factors.read import read_interactions
from shared.db.store import write_batch
from shared.events import Interaction, InteractionType
from tests.services.refresh.factors.synth import store_events, taste_world


def _rows(conn):
    return conn.execute("SELECT user_id, project_id, type, seq FROM interactions "
                        "ORDER BY seq").fetchall()


def test_read_matches_the_table(db_url):
    with psycopg.connect(db_url) as conn:
        empty = read_interactions(conn, None)
        assert (empty.n_rows, empty.watermark) == (0, 0)
        store_events(conn, taste_world(50, 60, 2000, seed=3))
        data = read_interactions(conn, None)
        expected = np.array(_rows(conn))
    order = np.argsort(data.seq)
    got = np.c_[data.user_ids[data.user], data.item_ids[data.item], data.type, data.seq][order]
    assert np.array_equal(got, expected)
    assert data.is_new.all() and data.watermark == expected[:, 3].max()


def _event(n, user=7, project=70):
    return Interaction(f"x{n}", InteractionType.appreciate, user, project, 1_735_689_600_000)


def test_rows_committed_out_of_seq_order_are_new_exactly_once(db_url):
    with psycopg.connect(db_url) as first, psycopg.connect(db_url) as late:
        write_batch(first, [_event(0)], [], "g", {})
        # `late` takes a lower seq but commits after the snapshot below was taken.
        late.execute("INSERT INTO interactions (event_id, user_id, project_id, type, ts) "
                     "VALUES ('late', 8, 80, 0, now())")
        write_batch(first, [_event(1)], [], "g", {})
        before = read_interactions(first, None)
        late.commit()
        after = read_interactions(first, before.snapshot)
        again = read_interactions(first, after.snapshot)
    assert before.n_rows == 2
    new_users = after.user_ids[after.user[after.is_new]]
    assert new_users.tolist() == [8]
    assert after.seq[after.is_new][0] < before.watermark  # lower seq, still seen as new
    assert not again.is_new.any()
