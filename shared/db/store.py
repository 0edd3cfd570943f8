"""The write path of the interaction store: one batch, one transaction, idempotent.

Rows go through binary COPY into temporary staging tables, then `INSERT … ON CONFLICT DO NOTHING`
into the real tables, so a replayed event is stored once. The consumer's next offsets are
written in the same transaction: the store and its position never disagree. Offsets may
move backwards (a partition reset to its beginning, a late write from a consumer that lost
its partitions): that only replays events, which the primary key absorbs; a forward jump
could skip events, and none is ever written without the events before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psycopg

from shared.events import Interaction, InteractionType, ProjectEvent

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_interactions (
    ord int4, event_id text, user_id int8, project_id int8, type int2, ts_ms int8
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_project_events (
    ord int4, event_id text, project_id int8, type text, owner_id int8, image_uri text,
    ts_ms int8
) ON COMMIT DELETE ROWS;
-- Several batches may share one transaction (ingest isolating a bad record in savepoints).
DELETE FROM stage_interactions;
DELETE FROM stage_project_events;
"""

_INSERT_INTERACTIONS = """
INSERT INTO interactions (event_id, user_id, project_id, type, ts)
SELECT event_id, user_id, project_id, type, to_timestamp(ts_ms / 1000.0)
FROM stage_interactions ORDER BY ord
ON CONFLICT (event_id) DO NOTHING
"""

# New project events only (replays are skipped); each project's newest new event then
# updates its latest state unless the stored state is newer; `published` adds ownership.
_INSERT_PROJECT_EVENTS = """
WITH new AS (
    INSERT INTO project_events (event_id, project_id, type, owner_id, image_uri, ts)
    SELECT event_id, project_id, type, owner_id, image_uri, to_timestamp(ts_ms / 1000.0)
    FROM stage_project_events ORDER BY ord
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id, project_id, type, owner_id, image_uri, ts, seq
), latest AS (
    SELECT DISTINCT ON (project_id) * FROM new ORDER BY project_id, ts DESC, seq DESC
), upserted AS (
    INSERT INTO projects AS p (project_id, owner_id, image_uri, status, published_at,
                               updated_at, last_event_id)
    SELECT project_id, owner_id, image_uri,
           CASE WHEN type = 'deleted' THEN 'deleted' ELSE 'live' END, ts, ts, event_id
    FROM latest
    ON CONFLICT (project_id) DO UPDATE SET
        owner_id = EXCLUDED.owner_id,
        -- a delete keeps the last image it had, for the record
        image_uri = CASE WHEN EXCLUDED.status = 'deleted' THEN p.image_uri
                         ELSE EXCLUDED.image_uri END,
        status = EXCLUDED.status, updated_at = EXCLUDED.updated_at,
        last_event_id = EXCLUDED.last_event_id,
        state_version = nextval('project_state_version')
    WHERE p.updated_at <= EXCLUDED.updated_at
    RETURNING 1
)
INSERT INTO interactions (event_id, user_id, project_id, type, ts)
SELECT 'own:' || event_id, owner_id, project_id, %(own)s, ts
FROM new WHERE type = 'published' ORDER BY seq
ON CONFLICT (event_id) DO NOTHING
"""

_UPSERT_OFFSETS = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
VALUES (%s, %s, %s, %s)
ON CONFLICT (group_id, topic, partition) DO UPDATE
SET next_offset = EXCLUDED.next_offset, updated_at = now()
"""

@dataclass
class BatchResult:
    interactions_new: int = 0
    project_events_staged: int = 0


# Binary COPY: no text to format or escape, and less for the server to parse (measured here:
# ~0.7 against ~1.1 µs of client CPU and ~2.5 against ~5.5 µs in all per row).
_INTERACTION_TYPES = ("int4", "text", "int8", "int8", "int2", "int8")
_PROJECT_TYPES = ("int4", "text", "int8", "text", "int8", "text", "int8")


def _copy_interactions(cur: psycopg.Cursor, rows: Iterable[Interaction]) -> None:
    with cur.copy("COPY stage_interactions FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_INTERACTION_TYPES)
        write = copy.write_row
        for i, r in enumerate(rows):
            write((i, r.event_id, r.user_id, r.project_id, r.type, r.ts_ms))


def _copy_project_events(cur: psycopg.Cursor, rows: Iterable[ProjectEvent]) -> None:
    with cur.copy("COPY stage_project_events FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_PROJECT_TYPES)
        for i, r in enumerate(rows):
            copy.write_row((i, r.event_id, r.project_id, r.type, r.owner_id, r.image_uri,
                            r.ts_ms))


def write_batch(conn: psycopg.Connection, interactions: list[Interaction],
                project_events: list[ProjectEvent], group_id: str,
                next_offsets: Mapping[tuple[str, int], int]) -> BatchResult:
    """Store one batch and the offsets after it, atomically. Safe to replay."""
    result = BatchResult()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(_STAGING)
        if interactions:
            _copy_interactions(cur, interactions)
            cur.execute(_INSERT_INTERACTIONS)
            result.interactions_new = cur.rowcount
        if project_events:
            _copy_project_events(cur, project_events)
            cur.execute(_INSERT_PROJECT_EVENTS, {"own": int(InteractionType.own)})
            result.project_events_staged = len(project_events)
        if next_offsets:
            cur.executemany(_UPSERT_OFFSETS, [(group_id, topic, partition, offset)
                                              for (topic, partition), offset
                                              in next_offsets.items()])
    return result


def load_offsets(conn: psycopg.Connection, group_id: str,
                 topic_partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Stored next offsets for these partitions (absent ones were never consumed)."""
    wanted = list(topic_partitions)
    if not wanted:
        return {}
    with conn.cursor() as cur:
        cur.execute(
            "SELECT topic, partition, next_offset FROM consumer_offsets "
            "WHERE group_id = %s AND (topic, partition) IN "
            "(SELECT * FROM unnest(%s::text[], %s::int[]))",
            (group_id, [t for t, _ in wanted], [p for _, p in wanted]))
        rows = cur.fetchall()
    conn.commit()
    return {(topic, partition): offset for topic, partition, offset in rows}
