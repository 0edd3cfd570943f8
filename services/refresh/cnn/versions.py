"""CNN versions in Postgres and on disk (format: shared/cnn.py), crash-safe as factors are:
reserve an id, build the artifact under a temporary name and rename it, then insert the row.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from services.refresh.factors.versions import clean, reserve_id
from shared.artifacts import atomic_dir, models_dir, remove_stale_tmp, version_dir, write_json
from shared.cnn import MODEL_FILE

log = logging.getLogger(__name__)
KIND = "cnn"
LOCK_KEY = 0x636F66656174_02  # "cofeat" + 2: one CNN refresh at a time
_VERSION_DIR = re.compile(r"^v(\d+)$")

__all__ = ["reserve_id", "refresh_lock", "write_artifact", "insert_version", "remove_orphans"]


@contextlib.contextmanager
def refresh_lock(conn: psycopg.Connection) -> Iterator[bool]:
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]
    conn.commit()
    try:
        yield got
    finally:
        if got and not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            conn.commit()


def write_artifact(data_dir: Path, version_id: int, run_dir: Path, meta: dict) -> str:
    final = version_dir(data_dir, KIND, version_id)
    with atomic_dir(final) as tmp:
        shutil.copy2(run_dir / "model.pt", tmp / MODEL_FILE)
        if (run_dir / "curves.png").exists():
            shutil.copy2(run_dir / "curves.png", tmp / "loss.png")
        write_json(tmp / "meta.json", clean({**meta, "version": version_id}))
    return str(final.relative_to(data_dir))


def insert_version(conn: psycopg.Connection, version_id: int, *, parent_id: int | None,
                   factor_version_id: int, params: dict, stats: dict, metrics: dict,
                   artifact: str | None, status: str) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO model_versions (id, kind, parent_id, factor_version_id, params, "
            "stats, metrics, artifact, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (version_id, KIND, parent_id, factor_version_id, Jsonb(clean(params)),
             Jsonb(clean(stats)), Jsonb(clean(metrics)), artifact, status))


def remove_orphans(conn: psycopg.Connection, data_dir: Path) -> list[Path]:
    """Version directories without a row are crashed runs; call holding the lock."""
    remove_stale_tmp(data_dir, KIND)
    root = models_dir(data_dir, KIND)
    if not root.exists():
        return []
    known = {row[0] for row in conn.execute(
        "SELECT id FROM model_versions WHERE kind = %s", (KIND,)).fetchall()}
    conn.commit()
    orphans = [path for path in root.iterdir()
               if (match := _VERSION_DIR.match(path.name)) and int(match[1]) not in known]
    for path in orphans:
        log.warning("removing %s: no model_versions row (a crashed run)", path)
        shutil.rmtree(path, ignore_errors=True)
    return orphans
