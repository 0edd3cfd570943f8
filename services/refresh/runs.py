"""What every refresh run does around its own work: check the schema, take its kind's
advisory lock (or skip), clean up crashed runs' leftovers, and report its duration."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg

from services.refresh import metrics as refresh_metrics
from services.refresh.versions import remove_orphans
from shared.db.connect import connect
from shared.db.engine import make_engine, require_current_schema
from shared.db.locks import advisory_lock
from shared.settings import Settings

log = logging.getLogger(__name__)
Result = TypeVar("Result")


def run_locked(settings: Settings, kind: str, lock_key: int,
               body: Callable[[psycopg.Connection], Result], skipped: Result) -> Result:
    """`body(conn)` under the lock; `skipped` when another run of this kind holds it.
    Results carry `status` and `version_id` for the metrics."""
    engine = make_engine(settings)
    try:
        require_current_schema(engine)
    finally:
        engine.dispose()
    started = time.monotonic()
    with connect(settings) as conn, advisory_lock(conn, lock_key) as got:
        if not got:
            log.info("another %s refresh holds the lock; skipping this run", kind)
            return skipped
        remove_orphans(conn, settings.data_dir, kind)
        result = body(conn)
    refresh_metrics.record_run(kind, time.monotonic() - started, result.status,
                               result.version_id)
    return result
