"""The warm-up collection: new projects' CNN vectors with their first interactions folded
in (shared/warmup.py), within seconds of ingest storing them.

A project is new while the factor version behind the live CNN has no factor for it. Every
COFEAT_WARM_POLL_S this part reads the interactions Postgres stored since its last look
(exactly: the snapshot it read last is recorded, and `pg_visible_in_snapshot` tells what
it missed, as the factor refresh does), keeps those on new projects by users the version
knows, and writes each touched project's fold-in into `<prefix>cofeat_projects_warm`
(an alias on `..._warm_v<model>_1`), at its length over the prior's and ranked by inner
product (shared/warmup.served): a collection of the older layout (unit rows, cosine) that
the alias still names is replaced and dropped.

The part shares the embedder's one thread with the stream, so every call is bounded: the
interactions a new model's warm-up starts from (all those its first snapshot saw) are read
one span of `seq` per call, and at most WRITE_CHUNK projects are folded in per call; a
call with work left comes round again at the next loop turn, not after the poll interval.

The prior is the project's row in the live projects collection, read from Milvus, with its
state_version: the warm-up row carries it, so a new image or a deletion there is followed
here at the next resync.

The live projects collection is never written here: it keeps holding exactly the image
vectors (the issue 13 invariant), so "similar images" stays pure image similarity. Only
"projects for a user" reads this collection (shared/client.py merges the two). A project
with no interaction has no row here: its vector is the CNN's, exactly.
"""

from __future__ import annotations

import itertools
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
SCAN_SPAN = 20_000  # interactions (by seq) per call of the start-up read
WRITE_CHUNK = 64  # projects folded in per call (a few tenths of a second on busy cores)
MAX_KEY = 2**63 - 1

_ISOLATION = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
_SNAPSHOT = "SELECT pg_current_snapshot()::text, (SELECT coalesce(max(seq), 0) FROM interactions)"
_SEEN = ("SELECT user_id, project_id, type FROM interactions "
         "WHERE seq > %(after)s AND seq <= %(upto)s AND NOT (project_id = ANY(%(known)s)) "
         "AND pg_visible_in_snapshot(ingest_xid, %(snapshot)s::pg_snapshot)")
_SINCE = ("SELECT user_id, project_id, type FROM interactions "
          "WHERE (ingest_xid::text)::bigint >= "
          "(pg_snapshot_xmin(%(snapshot)s::pg_snapshot)::text)::bigint "
          "AND NOT pg_visible_in_snapshot(ingest_xid, %(snapshot)s::pg_snapshot)")


def _array(rows: list[tuple]) -> np.ndarray:
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def snapshot(conn: psycopg.Connection) -> tuple[str, int]:
    """(a snapshot, the highest interaction seq it sees): what a start-up scan reads."""
    with conn.transaction():
        conn.execute(_ISOLATION)
        now, last = conn.execute(_SNAPSHOT).fetchone()
    return now, int(last)


def read_seen(conn: psycopg.Connection, snapshot: str, after: int, upto: int,
              known: np.ndarray) -> np.ndarray:
    """[user, project, type] rows with after < seq <= upto that `snapshot` saw, on projects
    outside `known`. A row it did not see (committed later, or still in flight) is read
    by `read_since` instead, so none is counted twice or missed."""
    with conn.transaction():
        return _array(conn.execute(_SEEN, {"after": after, "upto": upto, "snapshot": snapshot,
                                           "known": known.tolist()}).fetchall())


def read_since(conn: psycopg.Connection, snapshot: str) -> tuple[str, np.ndarray]:
    """(this read's snapshot, the [user, project, type] rows `snapshot` did not see)."""
    with conn.transaction():
        conn.execute(_ISOLATION)
        now = conn.execute(_SNAPSHOT).fetchone()[0]
        rows = conn.execute(_SINCE, {"snapshot": snapshot}).fetchall()
    return now, _array(rows)


@dataclass
class Warm:
    """What the part keeps for one live model."""

    model: int
    name: str
    factors: Factors
    space: fold.Space
    snapshot: str = ""  # the last read's: interactions it did not see are read next
    scan_after: int = 0  # the start-up scan's seq cursor
    scan_end: int = 0  # the highest seq the first snapshot saw: the scan ends there
    first: str = ""  # the first snapshot: what the start-up scan reads
    events: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # (user row, type)
    # To (re)compute, oldest first: one without a live row yet goes to the back of the
    # queue, so it never holds the others up.
    pending: dict[int, None] = field(default_factory=dict)
    next_resync: float = 0.0

    @property
    def scanning(self) -> bool:
        return self.scan_after < self.scan_end

    def queue(self, project_ids) -> None:
        self.pending.update(dict.fromkeys(project_ids))

    def take(self, count: int) -> list[int]:
        taken = list(itertools.islice(self.pending, count))
        for pid in taken:
            del self.pending[pid]
        return taken

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
        if self.state.scanning or self.state.pending:
            self.next_at = 0.0  # work left: the next turn, not the next interval

    # -- a model's warm-up collection ----------------------------------------------------

    def _start(self, target: Target) -> bool:
        factors = self._factors(target)
        if factors is None:
            self.unavailable = target.encoder.version
            return False
        name = contract.collection_name(self.settings, contract.WARM, target.encoder.version,
                                        contract.WARM_LAYOUT)
        if not mv.aliased(self.milvus, name):
            mv.create_fresh(self.milvus, name, contract.project_schema(target.encoder.dim))
            mv.request_index_and_load(self.milvus, self.settings, name, contract.WARM_METRIC)
        self.confirm_leading()
        old = mv.point_alias(self.milvus, self.alias, name)
        if old and old != name:
            mv.drop(self.milvus, old)  # an overlay: a query that misses it falls back
        first, last = snapshot(self.db())
        self.state = Warm(target.encoder.version, name, factors,
                          fold.space(factors.user_factors, factors.item_factors,
                                     self.params.regularization),
                          snapshot=first, scan_after=0, scan_end=last, first=first)
        log.info("warm-up of new projects on CNN v%d into %s: reading %d stored "
                 "interactions", self.state.model, name, last)
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
        if state.scanning:
            upto = min(state.scan_after + SCAN_SPAN, state.scan_end)
            state.queue(state.add(read_seen(self.db(), state.first, state.scan_after, upto,
                                            state.factors.item_ids)))
            state.scan_after = upto
        state.snapshot, rows = read_since(self.db(), state.snapshot)
        state.queue(state.add(rows))
        if not state.scanning and time.monotonic() >= state.next_resync:
            state.queue(self._stale(target))
            state.next_resync = time.monotonic() + RESYNC_EVERY_S
        if state.pending:
            self.write(target, state.take(WRITE_CHUNK))

    def _stale(self, target: Target) -> list[int]:
        """Warm rows whose prior moved (new image, deleted, another model) and projects
        with interactions but no row yet."""
        held = mv.rows_between(self.milvus, self.state.name, 0, MAX_KEY, "Session")
        ids = sorted(set(held) | set(self.state.events))
        priors: dict[int, tuple[int, int]] = {}
        for start in range(0, len(ids), CHUNK):
            priors |= mv.rows_with_ids(self.milvus, target.name, ids[start:start + CHUNK],
                                       "Session")
        return [pid for pid in ids if pid not in priors or held.get(pid) != priors[pid]]

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
                         contract.VECTOR_FIELD: fold.served(vector, state.space).tolist(),
                         "model_version": int(prior["model_version"]),
                         "owner_id": int(prior["owner_id"]),
                         "published_at": int(prior["published_at"]),
                         contract.STATE_VERSION: int(prior[contract.STATE_VERSION])})
        mv.upsert(self.milvus, [state.name], rows, self.settings.embed_insert_rows)
        gone = [pid for pid in ids if pid not in priors]
        mv.delete(self.milvus, [state.name], gone)
        # A project the live collection has no row for yet (not embedded yet) is tried
        # again, after the others.
        state.queue(pid for pid in gone if pid in state.events)
        metrics.WARM_PROJECTS.inc(len(rows))
