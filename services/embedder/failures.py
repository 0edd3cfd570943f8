"""Images that could not be embedded, retried at COFEAT_EMBED_RETRY_INTERVAL_S, never back
to back.

A failure belongs to one project state (`state_version`). `attempts` counts permanent
failures in a row (404, 403, not an image, refused by policy): at
COFEAT_EMBED_MAX_ATTEMPTS the state is parked, left out of Milvus and of what a complete
collection holds, until the project's state changes (an `updated` event with a fixed
image). A transient failure (5xx, reset, timeout: its reason starts "unavailable: ") sets
`attempts` to 0: a storage outage says nothing about the image, so however long it lasts,
nothing is parked for it, and the row the collection had stays until the storage answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import psycopg

from services.embedder import metrics
from services.embedder.states import State
from services.embedder.writer import Written
from shared.images import is_transient_reason
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")

_RECORD = """
INSERT INTO embed_failures AS f (project_id, image_uri, state_version, reason, attempts)
VALUES (%(id)s, %(uri)s, %(version)s, %(reason)s, CASE WHEN %(transient)s THEN 0 ELSE 1 END)
ON CONFLICT (project_id) DO UPDATE SET
    image_uri = EXCLUDED.image_uri, reason = EXCLUDED.reason,
    attempts = CASE WHEN %(transient)s THEN 0
                    WHEN f.state_version = EXCLUDED.state_version THEN f.attempts + 1
                    ELSE 1 END,
    state_version = EXCLUDED.state_version, last_failed_at = now(),
    first_failed_at = CASE WHEN f.state_version = EXCLUDED.state_version
                           THEN f.first_failed_at ELSE now() END
RETURNING project_id, attempts
"""

# Due: unparked and past its interval (transient ones wait the configured one even in a
# drain), or the project has moved on to a new state.
_DUE = """
SELECT f.project_id FROM embed_failures f JOIN projects p USING (project_id)
WHERE p.status = 'live' AND (
    p.state_version <> f.state_version
    OR (f.attempts < %(max)s AND f.attempts >= %(min)s
        AND f.last_failed_at <= now() - make_interval(
            secs => CASE WHEN f.attempts = 0 THEN %(transient)s ELSE %(interval)s END)))
ORDER BY f.last_failed_at LIMIT %(limit)s
"""


def record(cur: psycopg.Cursor, failed: Iterable[tuple[State, str]]) -> dict[int, int]:
    """One more attempt per failed state; returns {project_id: attempts at that state}
    (0: its storage did not answer)."""
    attempts = {}
    for state, reason in failed:
        cur.execute(_RECORD, {"id": state.project_id, "uri": state.image_uri,
                              "version": state.version, "reason": reason[:500],
                              "transient": is_transient_reason(reason)})
        project_id, count = cur.fetchone()
        attempts[project_id] = count
    return attempts


def clear(cur: psycopg.Cursor, project_ids: Iterable[int]) -> None:
    ids = list(project_ids)
    if ids:
        cur.execute("DELETE FROM embed_failures WHERE project_id = ANY(%s)", (ids,))


def due(conn: psycopg.Connection, max_attempts: int, interval_s: float, limit: int,
        transient_interval_s: float | None = None, permanent_only: bool = False) -> list[int]:
    """Projects whose failed image is due again: permanent failures `interval_s` after the
    last one, transient ones `transient_interval_s` after (default: the same)."""
    transient = interval_s if transient_interval_s is None else transient_interval_s
    with conn.transaction():
        rows = conn.execute(_DUE, {"max": max_attempts, "interval": interval_s,
                                   "transient": transient, "min": int(permanent_only),
                                   "limit": limit}).fetchall()
    return [row[0] for row in rows]


def waiting_for_storage(conn: psycopg.Connection) -> int:
    """Images whose last failure was transient: retried until their storage answers."""
    with conn.transaction():
        return conn.execute("SELECT count(*) FROM embed_failures WHERE attempts = 0"
                            ).fetchone()[0]


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
        attempts |= park(cur, written.refused, settings.embed_max_attempts)
        clear(cur, embedded)
        cur.execute(_FORGET_GONE, ([pid for pid, state in wanted.items() if state is None],))
        store_offsets(cur, settings.embed_group, next_offsets or {})
    log_failures(written.failed.values(), attempts, settings.embed_max_attempts)


def log_failures(failed: Iterable[tuple[State, str]], attempts: Mapping[int, int],
                 max_attempts: int) -> None:
    for state, reason in failed:
        count = attempts[state.project_id]
        metrics.IMAGE_FAILURES.inc()
        if count == 0:
            log.warning("project %d: image %s unavailable (%s): retried later, never parked "
                        "for that", state.project_id, state.image_uri, reason)
            continue
        if count >= max_attempts:
            metrics.PARKED.inc()
        log.warning("project %d: image %s unreadable (%s), attempt %d of %d%s",
                    state.project_id, state.image_uri, reason, count, max_attempts,
                    ": parked" if count >= max_attempts else "")


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
