"""Images that could not be embedded: retried after COFEAT_EMBED_RETRY_INTERVAL_S, parked
after COFEAT_EMBED_MAX_ATTEMPTS.

A failure belongs to one project state (`state_version`): a parked project is left out of
Milvus and of what a complete collection must hold, until its state changes (an `updated`
event with a fixed image) or a later embed of it succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import psycopg

from services.embedder import metrics
from services.embedder.states import State
from services.embedder.writer import Written
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")

_RECORD = """
INSERT INTO embed_failures AS f (project_id, image_uri, state_version, reason, attempts)
VALUES (%s, %s, %s, %s, 1)
ON CONFLICT (project_id) DO UPDATE SET
    image_uri = EXCLUDED.image_uri, reason = EXCLUDED.reason,
    attempts = CASE WHEN f.state_version = EXCLUDED.state_version THEN f.attempts + 1
                    ELSE 1 END,
    state_version = EXCLUDED.state_version, last_failed_at = now(),
    first_failed_at = CASE WHEN f.state_version = EXCLUDED.state_version
                           THEN f.first_failed_at ELSE now() END
RETURNING project_id, attempts
"""

# Due: below the limit and past the interval, or the project has moved on to a new state.
_DUE = """
SELECT f.project_id FROM embed_failures f JOIN projects p USING (project_id)
WHERE p.status = 'live' AND (
    p.state_version <> f.state_version
    OR (f.attempts < %(max)s AND f.last_failed_at <= now() - make_interval(secs => %(interval)s)))
ORDER BY f.last_failed_at LIMIT %(limit)s
"""


def record(cur: psycopg.Cursor, failed: Iterable[tuple[State, str]]) -> dict[int, int]:
    """One more attempt per failed state; returns {project_id: attempts at that state}."""
    attempts = {}
    for state, reason in failed:
        cur.execute(_RECORD, (state.project_id, state.image_uri, state.version, reason[:500]))
        project_id, count = cur.fetchone()
        attempts[project_id] = count
    return attempts


def clear(cur: psycopg.Cursor, project_ids: Iterable[int]) -> None:
    ids = list(project_ids)
    if ids:
        cur.execute("DELETE FROM embed_failures WHERE project_id = ANY(%s)", (ids,))


def due(conn: psycopg.Connection, max_attempts: int, interval_s: float,
        limit: int) -> list[int]:
    with conn.transaction():
        rows = conn.execute(_DUE, {"max": max_attempts, "interval": interval_s,
                                   "limit": limit}).fetchall()
    return [row[0] for row in rows]


_UPSERT_OFFSETS = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
VALUES (%s, %s, %s, %s)
ON CONFLICT (group_id, topic, partition) DO UPDATE
SET next_offset = EXCLUDED.next_offset, updated_at = now()
"""

# A deleted project's failure is moot.
_FORGET_GONE = """
DELETE FROM embed_failures f USING projects p
WHERE f.project_id = p.project_id AND p.status <> 'live' AND f.project_id = ANY(%s)
"""


def store_offsets(cur: psycopg.Cursor, group: str,
                  next_offsets: Mapping[tuple[str, int], int]) -> None:
    if next_offsets:
        cur.executemany(_UPSERT_OFFSETS, [(group, topic, partition, offset)
                                          for (topic, partition), offset
                                          in next_offsets.items()])


def commit(conn: psycopg.Connection, settings: Settings, written: Written,
           wanted: Mapping[int, State | None],
           next_offsets: Mapping[tuple[str, int], int] | None = None) -> None:
    """After Milvus acknowledged: failures counted, fixed ones cleared, offsets stored,
    in one transaction."""
    embedded = [pid for pid, state in wanted.items()
                if state is not None and pid not in written.failed]
    with conn.transaction(), conn.cursor() as cur:
        attempts = record(cur, written.failed.values())
        clear(cur, embedded)
        cur.execute(_FORGET_GONE, ([pid for pid, state in wanted.items() if state is None],))
        store_offsets(cur, settings.embed_group, next_offsets or {})
    log_failures(written.failed.values(), attempts, settings.embed_max_attempts)


def log_failures(failed: Iterable[tuple[State, str]], attempts: Mapping[int, int],
                 max_attempts: int) -> None:
    for state, reason in failed:
        count = attempts[state.project_id]
        metrics.IMAGE_FAILURES.inc()
        if count >= max_attempts:
            metrics.PARKED.inc()
        log.warning("project %d: image %s unreadable (%s), attempt %d of %d%s",
                    state.project_id, state.image_uri, reason, count, max_attempts,
                    ": parked" if count >= max_attempts else "")
