"""The Postgres side of the embedder: parked images, stored offsets, project reads.

A failed image is recorded with its reason and the state that failed, and retried from that
row every COFEAT_EMBED_RETRY_INTERVAL_S, never back to back. `attempts` counts permanent
failures in a row (404, 403, not an image, refused by policy): at
COFEAT_EMBED_MAX_ATTEMPTS the image is parked (left out of Milvus and of the backfill's
expected count) until a later successful embed, or a delete, clears the row. A transient
failure (5xx, reset, timeout: its reason starts "unavailable: ") sets `attempts` to 0: a
storage outage says nothing about the image, so however long it lasts, nothing is parked
for it, and the image is retried at the interval until the storage answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import psycopg

from services.embedder.encode import Item
from shared.images import is_transient_reason

_RECORD = """
INSERT INTO embed_failures AS f (project_id, image_uri, owner_id, published_at, event_ts,
                                  reason, attempts)
VALUES (%(id)s, %(uri)s, %(owner)s, to_timestamp(%(published)s / 1000.0),
        to_timestamp(%(ts)s / 1000.0), %(reason)s, CASE WHEN %(transient)s THEN 0 ELSE 1 END)
ON CONFLICT (project_id) DO UPDATE SET
    image_uri = EXCLUDED.image_uri, owner_id = EXCLUDED.owner_id,
    published_at = EXCLUDED.published_at, event_ts = EXCLUDED.event_ts,
    reason = EXCLUDED.reason,
    attempts = CASE WHEN %(transient)s THEN 0 ELSE f.attempts + 1 END,
    last_failed_at = now()
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
WHERE f.attempts < %(max)s AND f.attempts >= %(min)s
  AND f.last_failed_at <= now() - make_interval(
      secs => CASE WHEN f.attempts = 0 THEN %(transient)s ELSE %(interval)s END)
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
        cur.execute(_RECORD, {"id": item.project_id, "uri": item.image_uri,
                              "owner": item.owner_id, "published": item.published_ms,
                              "ts": item.ts_ms, "reason": reason,
                              "transient": is_transient_reason(reason)})
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
                limit: int, transient_interval_s: float | None = None,
                permanent_only: bool = False) -> list[Item]:
    """Failed, unparked images due again: permanent failures `interval_s` after the last
    one, transient ones `transient_interval_s` after (default: the same)."""
    transient = interval_s if transient_interval_s is None else transient_interval_s
    with conn.transaction():
        rows = conn.execute(_DUE, {"max": max_attempts, "interval": interval_s,
                                   "transient": transient, "min": int(permanent_only),
                                   "limit": limit}).fetchall()
    return [Item(*row) for row in rows]


def waiting_for_storage(conn: psycopg.Connection) -> int:
    """Images whose last failure was transient: retried until their storage answers."""
    with conn.transaction():
        return conn.execute("SELECT count(*) FROM embed_failures WHERE attempts = 0"
                            ).fetchone()[0]


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
