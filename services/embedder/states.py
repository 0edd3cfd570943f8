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
    failing: bool = False  # this very state's image failed (retried later, or parked)


# A failure counts for exactly the state whose image failed: a newer state is tried anew.
_FAILING = """EXISTS (SELECT 1 FROM embed_failures f WHERE f.project_id = p.project_id
    AND f.state_version = p.state_version)"""

_COLUMNS = f"""p.project_id, p.status = 'live', p.owner_id,
    (extract(epoch FROM p.published_at) * 1000)::int8, p.image_uri, p.state_version,
    {_FAILING}"""

_CURRENT = f"SELECT {_COLUMNS} FROM projects p WHERE p.project_id = ANY(%(ids)s)"

_LIVE_PAGE = f"""
SELECT {_COLUMNS} FROM projects p
WHERE p.status = 'live' AND p.project_id > %(after)s AND NOT {_FAILING}
ORDER BY p.project_id LIMIT %(limit)s
"""

_EXPECTED_PAGE = f"""
SELECT p.project_id, p.state_version FROM projects p
WHERE p.status = 'live' AND p.project_id > %(after)s AND NOT {_FAILING}
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


def live_page(conn: psycopg.Connection, after: int, limit: int) -> list[State]:
    """Live projects with ids above `after` whose image has not failed, in id order
    (keyset pagination)."""
    rows = _read(conn, _LIVE_PAGE, {"after": after, "limit": limit})
    return [State(*row) for row in rows]


def expected_page(conn: psycopg.Connection, after: int,
                  limit: int) -> list[tuple[int, int]]:
    """(project_id, state_version) a complete collection holds, ids above `after`."""
    return [tuple(row) for row in _read(conn, _EXPECTED_PAGE,
                                        {"after": after, "limit": limit})]


def wanted(state: State | None) -> State | None:
    """What a collection should hold for a project: its live state, or no row (deleted,
    unknown to Postgres, or an image that failed: retries go through `failures`)."""
    return state if state is not None and state.live and not state.failing else None


def wanted_for(conn: psycopg.Connection, project_ids: Iterable[int]) -> dict[int, State | None]:
    found = current(conn, project_ids)
    return {pid: wanted(found.get(pid)) for pid in set(project_ids)}
