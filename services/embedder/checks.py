"""`cofeat embed --verify` and `--repair`: one comparison of the live collection with
Postgres, from the command line, and the repair of what drifted."""

from __future__ import annotations

import logging

from services.embedder import reconcile, states
from services.embedder.leader import leader_lock
from services.embedder.service import Embedder
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")


def run_check(settings: Settings, repair: bool) -> tuple[int, dict]:
    """(exit code, report): 0 no drift (or all repaired), 1 drift, 2 cannot check."""
    lock = leader_lock(settings)
    if repair and not lock.try_acquire():
        return 2, {"error": "another embedder holds the leader lock; it repairs drift by "
                            "itself every COFEAT_EMBED_RECONCILE_EVERY_S"}
    embedder = Embedder(settings, lock=lock if repair else None)
    try:
        embedder.start()
        target = embedder.lifecycle.live
        if target is None:
            return 2, {"error": "no projects alias on a collection of a known CNN version"}
        drift = reconcile.check(embedder.milvus, embedder.db, target)
        if not drift or not repair:
            return (1 if drift else 0), reconcile.report(target, drift)
        wanted = states.wanted_for(embedder.db(), drift.ids())
        embedder.record(wanted, embedder.writer.apply(wanted, [target]))
        left = reconcile.check(embedder.milvus, embedder.db, target)
        return (1 if left else 0), reconcile.report(target, drift, repaired=not left)
    finally:
        embedder.close()
        lock.release()
