"""What factor and CNN versions share: crash cleanup (the per-kind refresh lock is
shared.db.locks.advisory_lock)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import psycopg

from shared.artifacts import models_dir, remove_stale_tmp

log = logging.getLogger(__name__)
_VERSION_DIR = re.compile(r"^v(\d+)$")


def remove_orphans(conn: psycopg.Connection, data_dir: Path, kind: str) -> list[Path]:
    """Delete version directories without a row (crashed runs); call holding the lock."""
    remove_stale_tmp(data_dir, kind)
    root = models_dir(data_dir, kind)
    if not root.exists():
        return []
    known = {row[0] for row in conn.execute(
        "SELECT id FROM model_versions WHERE kind = %s", (kind,)).fetchall()}
    conn.commit()
    orphans = [path for path in root.iterdir()
               if (match := _VERSION_DIR.match(path.name)) and int(match[1]) not in known]
    for path in orphans:
        log.warning("removing %s: no model_versions row (a crashed run)", path)
        shutil.rmtree(path, ignore_errors=True)
    return orphans
