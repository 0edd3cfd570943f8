"""Factor versions in Postgres and on disk, written so a crash never leaves half a version.

Order of a write: reserve an id from the table's identity sequence, build the artifact
under a temporary name and rename it to `v<id>` (shared.artifacts.atomic_dir), then insert
the row in one transaction. Readers find versions only through rows, so a crash before the
insert leaves at most a directory without a row, which the next run deletes while it holds
the lock; a crash after the insert leaves a complete version.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from shared.artifacts import atomic_dir, version_dir
from shared.db.locks import advisory_lock
from shared.factors import Factors, write_factors

log = logging.getLogger(__name__)
KIND = "factors"
# pg_try_advisory_lock key shared by every factor refresh ("cofeat" + 1).
LOCK_KEY = 0x636F66656174_01


def refresh_lock(conn: psycopg.Connection):
    return advisory_lock(conn, LOCK_KEY)


def latest_attempt(conn: psycopg.Connection) -> dict | None:
    """id, params and stats of the newest promoted or rejected factor version."""
    row = conn.execute(
        "SELECT id, params, stats FROM model_versions WHERE kind = %s "
        "AND status IN ('promoted', 'rejected') ORDER BY id DESC LIMIT 1", (KIND,)).fetchone()
    conn.commit()
    return {"id": int(row[0]), "params": row[1], "stats": row[2]} if row else None


def reserve_id(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT nextval(pg_get_serial_sequence('model_versions', 'id'))")
    version_id = int(row.fetchone()[0])
    conn.commit()
    return version_id


def write_artifact(data_dir: Path, version_id: int, factors: Factors) -> str:
    """The version's directory, complete or absent; returns its path under data_dir."""
    final = version_dir(data_dir, KIND, version_id)
    with atomic_dir(final) as tmp:
        write_factors(tmp, factors)
    return str(final.relative_to(data_dir))


def insert_version(conn: psycopg.Connection, version_id: int, *, parent_id: int | None,
                   watermark: int, params: dict, stats: dict, metrics: dict,
                   artifact: str | None, status: str) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO model_versions (id, kind, parent_id, watermark, params, stats, "
            "metrics, artifact, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (version_id, KIND, parent_id, watermark, Jsonb(clean(params)),
             Jsonb(clean(stats)), Jsonb(clean(metrics)), artifact, status))


def record_failure(conn: psycopg.Connection, version_id: int, parent_id: int | None,
                   params: dict, error: BaseException) -> None:
    """A 'failed' row without artifact, so operators see the attempt; best effort."""
    try:
        conn.rollback()
        insert_version(conn, version_id, parent_id=parent_id, watermark=None, params=params,
                       stats={}, metrics={"error": f"{type(error).__name__}: {error}"[:500]},
                       artifact=None, status="failed")
    except psycopg.Error:
        log.exception("could not record the failed version %d", version_id)



def remove_dir(data_dir: Path, version_id: int) -> None:
    shutil.rmtree(version_dir(data_dir, KIND, version_id), ignore_errors=True)


def clean(value):
    """JSON-safe: NaN and infinities become null (jsonb rejects them), numpy to Python."""
    return json.loads(json.dumps(value, default=_plain), parse_constant=lambda _: None)


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)
