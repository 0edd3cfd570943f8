"""interaction_pairs, kept by the trigger on interactions: every stored event counted once."""

import threading

import psycopg

from shared.db.store import write_batch
from shared.events import Interaction, InteractionType, ProjectEvent

T0 = 1_700_000_000_000


def _pairs(conn):
    return conn.execute("SELECT user_id, project_id, views, appreciations, comments, owns, "
                        "last_appreciation_seq FROM interaction_pairs "
                        "ORDER BY user_id, project_id").fetchall()


def _from_events(conn):
    return conn.execute(
        "SELECT user_id, project_id, count(*) FILTER (WHERE type = 0), "
        "count(*) FILTER (WHERE type = 1), count(*) FILTER (WHERE type = 2), "
        "count(*) FILTER (WHERE type = 3), max(seq) FILTER (WHERE type = 1) "
        "FROM interactions GROUP BY user_id, project_id ORDER BY user_id, project_id"
    ).fetchall()


def _events(prefix: str, n: int, users: int = 5, projects: int = 7):
    return [Interaction(f"{prefix}{k}", InteractionType(k % 3), 1 + k % users,
                        100 + k % projects, T0 + k) for k in range(n)]


def test_counts_follow_the_events_through_replays_and_ownership(db_url):
    with psycopg.connect(db_url) as conn:
        batch = _events("a", 60)
        write_batch(conn, batch + batch[:5], [], "g", {})  # duplicates within a batch
        write_batch(conn, batch[20:], [ProjectEvent("p1", "published", 100, 1, "/x.png", T0)],
                    "g", {})  # a replay, and the owner's pair
        write_batch(conn, [], [ProjectEvent("p1", "published", 100, 1, "/x.png", T0)], "g", {})
        pairs = _pairs(conn)
        assert pairs == _from_events(conn)
        assert sum(row[2] + row[3] + row[4] + row[5] for row in pairs) == 61
        owner = [row for row in pairs if row[:2] == (1, 100)][0]
        assert owner[5] == 1


def test_concurrent_batches_on_the_same_pairs_neither_deadlock_nor_lose_counts(db_url):
    errors = []

    def ingest(prefix: str, users: int):
        try:
            with psycopg.connect(db_url) as conn:
                for round_ in range(15):
                    # Overlapping but different sets of pairs, so no two batches would
                    # meet their shared pairs in the same order unless sorted.
                    batch = _events(f"{prefix}{round_}-", 200, users=users + round_ % 3,
                                    projects=7 + round_ % 5)
                    write_batch(conn, batch[::-1] if users % 2 else batch, [], prefix, {})
        except Exception as error:  # reported below, with the thread's name
            errors.append(f"{prefix}: {error!r}")

    threads = [threading.Thread(target=ingest, args=(p, u)) for p, u in (("x", 5), ("y", 8))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    with psycopg.connect(db_url) as conn:
        pairs = _pairs(conn)
        assert pairs == _from_events(conn)
        assert sum(row[2] + row[3] + row[4] for row in pairs) == 2 * 15 * 200
