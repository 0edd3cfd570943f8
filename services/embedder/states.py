"""Project states as Postgres resolved them: the only thing the embedder ever writes.

Ingest orders each project's events and keeps the result in `projects`, with a
`state_version` that changes on every state change. The embedder never reconciles events
itself: whatever tells it a project changed (a stream event, a backfill page, a retry, a
reconciliation), it reads the project's current row here and writes that, with its
version, so Milvus converges to the store whatever the order or duplication of events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg


@dataclass(frozen=True, slots=True)
class State:
    project_id: int
    live: bool
    owner_id: int
    published_ms: int
    image_uri: str
    version: int  # projects.state_version
    # How this very state's image failed, if it did: "transient" (its storage did not
    # answer: retried at the interval, never parked) or "permanent" (retried, then parked).
    failure: str | None = None


# A failure counts for exactly the state whose image failed: a newer state is tried anew.
_FAILURE = """(SELECT CASE WHEN f.attempts = 0 THEN 'transient' ELSE 'permanent' END
    FROM embed_failures f WHERE f.project_id = p.project_id
    AND f.state_version = p.state_version)"""

_COLUMNS = f"""p.project_id, p.status = 'live', p.owner_id,
    (extract(epoch FROM p.published_at) * 1000)::int8, p.image_uri, p.state_version,
    {_FAILURE}"""

_CURRENT = f"SELECT {_COLUMNS} FROM projects p WHERE p.project_id = ANY(%(ids)s)"

_LIVE_PAGE = f"""
SELECT {_COLUMNS} FROM projects p
WHERE p.status = 'live' AND p.project_id > %(after)s AND p.project_id <= %(upto)s
  AND {_FAILURE} IS NULL
ORDER BY p.project_id LIMIT %(limit)s
"""

_LAST_ID = "SELECT coalesce(max(project_id), -1) FROM projects"

# NULL: its storage did not answer; the row it has (an older state's) or none both do.
_EXPECTED_PAGE = f"""
SELECT p.project_id, CASE WHEN {_FAILURE} IS NULL THEN p.state_version END
FROM projects p
WHERE p.status = 'live' AND p.project_id > %(after)s
  AND coalesce({_FAILURE}, '') <> 'permanent'
ORDER BY p.project_id LIMIT %(limit)s
"""


def _read(conn: psycopg.Connection, sql: str, params: dict) -> list[tuple]:
    with conn.transaction():
        return conn.execute(sql, params).fetchall()


def current(conn: psycopg.Connection, project_ids: Iterable[int]) -> dict[int, State]:
    """The stored state of each of these projects; ids Postgres does not know are absent."""
    ids = sorted(set(project_ids))
    if not ids:
        return {}
    return {row[0]: State(*row) for row in _read(conn, _CURRENT, {"ids": ids})}


def live_page(conn: psycopg.Connection, after: int, limit: int, upto: int) -> list[State]:
    """Live projects with ids in (`after`, `upto`] whose image has not failed, in id
    order (keyset pagination)."""
    rows = _read(conn, _LIVE_PAGE, {"after": after, "upto": upto, "limit": limit})
    return [State(*row) for row in rows]


def last_id(conn: psycopg.Connection) -> int:
    """The highest project id Postgres holds, -1 when none."""
    return _read(conn, _LAST_ID, {})[0][0]


def expected_page(conn: psycopg.Connection, after: int,
                  limit: int) -> list[tuple[int, int | None]]:
    """(project_id, state_version) a complete collection holds, ids above `after`; None:
    any row or none (a state whose storage did not answer yet)."""
    return [tuple(row) for row in _read(conn, _EXPECTED_PAGE,
                                        {"after": after, "limit": limit})]


LEAVE = object()  # what `wanted` says of a state whose image is only unavailable for now


def wanted(state: State | None) -> State | None | object:
    """What a collection should hold for a project: its live state; no row (deleted,
    unknown to Postgres, or an image that failed for good); or LEAVE: the row it has stays
    until the storage answers (the retry step writes it then)."""
    if state is None or not state.live or state.failure == "permanent":
        return None
    return LEAVE if state.failure == "transient" else state


def wanted_for(conn: psycopg.Connection, project_ids: Iterable[int]) -> dict[int, State | None]:
    """{project_id: state or None} for the writer; projects to LEAVE are left out."""
    found = current(conn, project_ids)
    out = {pid: wanted(found.get(pid)) for pid in set(project_ids)}
    return {pid: state for pid, state in out.items() if state is not LEAVE}
