"""CNN versions in Postgres and on disk (format: shared/cnn.py), crash-safe as factors are:
reserve an id, build the artifact under a temporary name and rename it, then insert the row.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from services.refresh.factors.versions import clean, reserve_id
from shared.artifacts import atomic_dir, version_dir, write_json
from shared.cnn import MODEL_FILE
from shared.db.locks import advisory_lock

log = logging.getLogger(__name__)
KIND = "cnn"
LOCK_KEY = 0x636F66656174_02  # "cofeat" + 2: one CNN refresh at a time

__all__ = ["reserve_id", "refresh_lock", "write_artifact", "insert_version"]


def refresh_lock(conn: psycopg.Connection):
    return advisory_lock(conn, LOCK_KEY)


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

