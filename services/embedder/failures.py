"""The Postgres side of the embedder: parked images, stored offsets, project reads.

A failed image is recorded with its attempt count and the state that failed; below
COFEAT_EMBED_MAX_ATTEMPTS it is retried later from that row (ingest may not have stored the
project yet), at the limit it is parked (left out of Milvus and of the backfill's expected
count) until a later successful embed, or a delete, clears the row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import psycopg

from services.embedder.encode import Item

_RECORD = """
INSERT INTO embed_failures AS f (project_id, image_uri, owner_id, published_at, event_ts,
                                  reason, attempts)
VALUES (%s, %s, %s, to_timestamp(%s / 1000.0), to_timestamp(%s / 1000.0), %s, 1)
ON CONFLICT (project_id) DO UPDATE SET
    image_uri = EXCLUDED.image_uri, owner_id = EXCLUDED.owner_id,
    published_at = EXCLUDED.published_at, event_ts = EXCLUDED.event_ts,
    reason = EXCLUDED.reason,
    attempts = f.attempts + 1, last_failed_at = now()
RETURNING project_id, attempts
"""

_UPSERT_OFFSETS = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
VALUES (%s, %s, %s, %s)
ON CONFLICT (group_id, topic, partition) DO UPDATE
SET next_offset = EXCLUDED.next_offset, updated_at = now()
"""

_ITEM_COLUMNS = ("p.project_id, p.owner_id, "
                 "(extract(epoch FROM p.published_at) * 1000)::int8, p.image_uri, "
                 "(extract(epoch FROM p.updated_at) * 1000)::int8")

_LIVE_PAGE = f"""
SELECT {_ITEM_COLUMNS} FROM projects p
WHERE p.status = 'live' AND p.project_id > %(after)s
  AND NOT EXISTS (SELECT 1 FROM embed_failures f
                  WHERE f.project_id = p.project_id AND f.attempts >= %(max)s)
ORDER BY p.project_id LIMIT %(limit)s
"""

_DUE = """
SELECT f.project_id, f.owner_id, (extract(epoch FROM f.published_at) * 1000)::int8,
       f.image_uri, (extract(epoch FROM f.event_ts) * 1000)::int8
FROM embed_failures f
WHERE f.attempts < %(max)s
  AND f.last_failed_at <= now() - make_interval(secs => %(interval)s)
ORDER BY f.last_failed_at LIMIT %(limit)s
"""

_EXPECTED = """
SELECT count(*) FROM projects p
WHERE p.status = 'live' AND NOT EXISTS (
    SELECT 1 FROM embed_failures f WHERE f.project_id = p.project_id AND f.attempts >= %s)
"""


def record(cur: psycopg.Cursor, failed: Iterable[tuple[Item, str]]) -> dict[int, int]:
    """Count one more attempt per failed item; returns {project_id: attempts}."""
    attempts = {}
    for item, reason in failed:
        cur.execute(_RECORD, (item.project_id, item.image_uri, item.owner_id,
                              item.published_ms, item.ts_ms, reason))
        project_id, count = cur.fetchone()
        attempts[project_id] = count
    return attempts


def clear(cur: psycopg.Cursor, project_ids: list[int]) -> None:
    if project_ids:
        cur.execute("DELETE FROM embed_failures WHERE project_id = ANY(%s)", (project_ids,))


def store_offsets(cur: psycopg.Cursor, group: str,
                  next_offsets: Mapping[tuple[str, int], int]) -> None:
    if next_offsets:
        cur.executemany(_UPSERT_OFFSETS, [(group, topic, partition, offset)
                                          for (topic, partition), offset
                                          in next_offsets.items()])


def live_page(conn: psycopg.Connection, after: int, limit: int, max_attempts: int) -> list[Item]:
    """Live, unparked projects with ids above `after`, in id order (keyset pagination)."""
    with conn.transaction():
        rows = conn.execute(_LIVE_PAGE, {"after": after, "limit": limit,
                                         "max": max_attempts}).fetchall()
    return [Item(*row) for row in rows]


def due_retries(conn: psycopg.Connection, max_attempts: int, interval_s: float,
                limit: int) -> list[Item]:
    with conn.transaction():
        rows = conn.execute(_DUE, {"max": max_attempts, "interval": interval_s,
                                   "limit": limit}).fetchall()
    return [Item(*row) for row in rows]


def expected_count(conn: psycopg.Connection, max_attempts: int) -> int:
    """What a complete projects collection holds: live projects minus parked ones."""
    with conn.transaction():
        return conn.execute(_EXPECTED, (max_attempts,)).fetchone()[0]


def published_ms(conn: psycopg.Connection, project_ids: list[int]) -> dict[int, int]:
    """First publication time of known projects (update events do not carry it)."""
    if not project_ids:
        return {}
    with conn.transaction():
        rows = conn.execute(
            "SELECT project_id, (extract(epoch FROM published_at) * 1000)::int8 "
            "FROM projects WHERE project_id = ANY(%s)", (project_ids,)).fetchall()
    return dict(rows)


def last_event_seq(conn: psycopg.Connection) -> int:
    with conn.transaction():
        return conn.execute("SELECT coalesce(max(seq), 0) FROM project_events").fetchone()[0]


def changed_since(conn: psycopg.Connection, seq: int) -> set[int]:
    """Projects ingest stored an event for after `seq`: their state moved under us."""
    with conn.transaction():
        rows = conn.execute("SELECT DISTINCT project_id FROM project_events WHERE seq > %s",
                            (seq,)).fetchall()
    return {row[0] for row in rows}


def park(cur: psycopg.Cursor, project_ids: Iterable[int], max_attempts: int) -> dict[int, int]:
    """Park recorded failures now (Milvus refused their rows: the same call fails again);
    returns {project_id: attempts}."""
    project_ids = list(project_ids)
    if not project_ids:
        return {}
    cur.execute("UPDATE embed_failures SET attempts = greatest(attempts, %s) "
                "WHERE project_id = ANY(%s) RETURNING project_id, attempts",
                (max_attempts, project_ids))
    return dict(cur.fetchall())
