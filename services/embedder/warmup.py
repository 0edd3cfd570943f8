"""The warm-up collection: new projects' CNN vectors with their first interactions folded
in (shared/warmup.py), within seconds of ingest storing them.

A project is new while the factor version behind the live CNN has no factor for it. Every
COFEAT_WARM_POLL_S this part reads the interactions Postgres stored since its last look
(exactly: the snapshot it read last is recorded, and `pg_visible_in_snapshot` tells what
it missed, as the factor refresh does), keeps those on new projects by users the version
knows, and writes each touched project's fold-in into `<prefix>cofeat_projects_warm`
(an alias on `..._warm_v<model>`). The prior is the project's row in the live projects
collection, read from Milvus, with its state_version: the warm-up row carries it, so a new
image or a deletion there is followed here at the next resync.

The live projects collection is never written here: it keeps holding exactly the image
vectors (the issue 13 invariant), so "similar images" stays pure image similarity. Only
"projects for a user" reads this collection (shared/client.py merges the two). A project
with no interaction has no row here: its vector is the CNN's, exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psycopg

from services.embedder import collections as mv
from services.embedder import metrics
from services.embedder.writer import Target
from shared import milvus as contract
from shared import warmup as fold
from shared.factors import Factors, factor_version, load_factors
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")
RESYNC_EVERY_S = 30.0  # how often warm rows are compared with the live collection
CHUNK = 1000  # ids per Milvus query
MAX_KEY = 2**63 - 1

_BEGIN = ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
          "SELECT pg_current_snapshot()::text")
_ALL = ("SELECT user_id, project_id, type FROM interactions "
        "WHERE NOT (project_id = ANY(%(known)s))")
_SINCE = ("SELECT user_id, project_id, type FROM interactions "
          "WHERE (ingest_xid::text)::bigint >= "
          "(pg_snapshot_xmin(%(snapshot)s::pg_snapshot)::text)::bigint "
          "AND NOT pg_visible_in_snapshot(ingest_xid, %(snapshot)s::pg_snapshot)")


def read_events(conn: psycopg.Connection, snapshot: str | None,
                known: np.ndarray) -> tuple[str, np.ndarray]:
    """(this read's snapshot, [user, project, type] rows): every interaction on a project
    outside `known` when `snapshot` is None, else those `snapshot` did not see."""
    with conn.transaction():
        for statement in _BEGIN[:-1]:
            conn.execute(statement)
        now = conn.execute(_BEGIN[-1]).fetchone()[0]
        if snapshot is None:
            rows = conn.execute(_ALL, {"known": known.tolist()}).fetchall()
        else:
            rows = conn.execute(_SINCE, {"snapshot": snapshot}).fetchall()
    return now, np.array(rows, dtype=np.int64).reshape(-1, 3)


@dataclass
class Warm:
    """What the part keeps for one live model."""

    model: int
    name: str
    factors: Factors
    space: fold.Space
    snapshot: str | None = None
    events: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # (user row, type)
    pending: set[int] = field(default_factory=set)  # to (re)compute
    next_resync: float = 0.0

    def add(self, rows: np.ndarray) -> set[int]:
        """Keep the rows on new projects by known users; the projects they touched."""
        if not len(rows):
            return set()
        users = self.factors.user_rows(rows[:, 0])
        new = (self.factors.item_rows(rows[:, 1]) < 0) & (users >= 0)
        for user, project, kind in zip(users[new].tolist(), rows[new, 1].tolist(),
                                       rows[new, 2].tolist(), strict=True):
            self.events.setdefault(project, []).append((user, kind))
        return set(rows[new, 1].tolist())


class WarmUp:
    def __init__(self, settings: Settings, milvus: mv.Milvus,
                 db: Callable[[], psycopg.Connection], live: Callable[[], Target | None],
                 confirm_leading: Callable[[], None]):
        self.settings, self.milvus, self.db, self.live = settings, milvus, db, live
        self.confirm_leading = confirm_leading
        self.params = fold.WarmParams.from_settings(settings)
        self.alias = contract.alias(settings, contract.WARM)
        self.state: Warm | None = None
        self.next_at = 0.0
        self.unavailable: int | None = None  # a model whose factors cannot be read

    def step(self) -> None:
        if not self.settings.warm_enabled or time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.settings.warm_poll_s
        target = self.live()
        if target is None or target.encoder.feature != "head":
            return  # no factor-space vectors to fold into
        stale = self.state is None or self.state.model != target.encoder.version
        if stale and (self.unavailable == target.encoder.version or not self._start(target)):
            return
        self.poll(target)

    # -- a model's warm-up collection ----------------------------------------------------

    def _start(self, target: Target) -> bool:
        factors = self._factors(target)
        if factors is None:
            self.unavailable = target.encoder.version
            return False
        name = contract.collection_name(self.settings, contract.WARM, target.encoder.version)
        if not mv.aliased(self.milvus, name):
            mv.create_fresh(self.milvus, name, contract.project_schema(target.encoder.dim))
            mv.request_index_and_load(self.milvus, self.settings, name)
        self.confirm_leading()
        old = mv.point_alias(self.milvus, self.alias, name)
        if old and old != name:
            mv.drop(self.milvus, old)  # an overlay: a query that misses it falls back
        self.state = Warm(target.encoder.version, name, factors,
                          fold.space(factors.user_factors, factors.item_factors,
                                     self.params.regularization))
        log.info("warm-up of new projects on CNN v%d into %s", self.state.model, name)
        return True

    def _factors(self, target: Target) -> Factors | None:
        version_id = (target.encoder.version_row.get("factor_version_id")
                      or target.encoder.meta.get("factor_version"))
        row = factor_version(self.db(), int(version_id)) if version_id else None
        try:
            factors = load_factors(self.settings.data_dir, row) if row else None
        except (OSError, ValueError) as error:
            log.warning("no warm-up for CNN v%d: factor version %s unreadable (%s)",
                        target.encoder.version, version_id, error)
            return None
        if factors is None or factors.user_factors.shape[1] != target.encoder.dim:
            log.warning("no warm-up for CNN v%d: no factor version of its width",
                        target.encoder.version)
            return None
        return factors

    # -- one pass ------------------------------------------------------------------------

    def poll(self, target: Target) -> None:
        state = self.state
        snapshot, rows = read_events(self.db(), state.snapshot, state.factors.item_ids)
        state.snapshot = snapshot
        state.pending |= state.add(rows)
        if time.monotonic() >= state.next_resync:
            state.pending |= self._stale(target)
            state.next_resync = time.monotonic() + RESYNC_EVERY_S
        if state.pending:
            self.write(target, sorted(state.pending))

    def _stale(self, target: Target) -> set[int]:
        """Warm rows whose prior moved (new image, deleted, another model) and projects
        with interactions but no row yet."""
        held = mv.rows_between(self.milvus, self.state.name, 0, MAX_KEY, "Session")
        ids = sorted(set(held) | set(self.state.events))
        priors = self._priors(target, ids)
        return {pid for pid in ids
                if pid not in priors or held.get(pid) != (priors[pid]["state_version"],
                                                         priors[pid]["model_version"])}

    def _priors(self, target: Target, ids: list[int]) -> dict[int, dict]:
        fields = [contract.VECTOR_FIELD, "owner_id", "published_at", "model_version",
                  contract.STATE_VERSION]
        out: dict[int, dict] = {}
        for start in range(0, len(ids), CHUNK):
            part = ids[start:start + CHUNK]
            rows = self.milvus.call(lambda c, part=part: c.query(
                target.name, filter=f"{contract.PROJECT_KEY} in {part}",
                output_fields=fields, consistency_level="Session"))
            out |= {int(r[contract.PROJECT_KEY]): r for r in rows}
        return out

    def write(self, target: Target, ids: list[int]) -> None:
        """Fold in every project of `ids` that has a prior; delete the rows of those
        without one (deleted, or image failed); keep the rest pending (not embedded yet)."""
        state, priors = self.state, self._priors(target, ids)
        rows = []
        for pid in ids:
            prior = priors.get(pid)
            events = state.events.get(pid)
            if prior is None or not events:
                continue
            users, kinds = zip(*events, strict=True)
            user_rows, sums = fold.pair_sums(np.array(users), np.array(kinds),
                                             self.params.weights)
            vector = fold.fold_in(np.asarray(prior[contract.VECTOR_FIELD]), user_rows, sums,
                                  state.space, self.params)
            rows.append({contract.PROJECT_KEY: pid,
                         contract.VECTOR_FIELD: (vector / np.linalg.norm(vector)).tolist(),
                         "model_version": int(prior["model_version"]),
                         "owner_id": int(prior["owner_id"]),
                         "published_at": int(prior["published_at"]),
                         contract.STATE_VERSION: int(prior[contract.STATE_VERSION])})
        mv.upsert(self.milvus, [state.name], rows, self.settings.embed_insert_rows)
        gone = [pid for pid in ids if pid not in priors]
        mv.delete(self.milvus, [state.name], gone)
        # A project the live collection has no row for yet (not embedded yet) is tried
        # again at the next pass.
        state.pending = {pid for pid in gone if pid in state.events}
        metrics.WARM_PROJECTS.inc(len(rows))
