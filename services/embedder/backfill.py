"""Filling the collections of a new CNN version, in steps, then one alias move per kind.

The service interleaves `step()` with stream batches, so queries keep being served from
the old collection and new events keep flowing; stream writes reach both collections
while a backfill runs. A fill step reads one page of live projects from Postgres and hands
it to the writer, which skips rows the stream already wrote at the same state version.
Nothing needs reconciling in memory: every write, from the stream or from a page, is the
state Postgres held when it was read, and they happen one after another in one thread.

Before the alias moves, the collection is compared with Postgres id by id
(services/embedder/reconcile.py): no missing, extra or stale row, after a bounded number
of repairs for changes that landed meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import psycopg

from services.embedder import collections as mv
from services.embedder import metrics, reconcile, states
from services.embedder.writer import Target, Writer, Written
from shared import milvus as contract
from shared.factors import factor_version, load_factors
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")


class BackfillFailed(RuntimeError):
    pass


class Backfill:
    """Builds `<kind>_v<model>` for the kinds whose alias is not on this version yet."""

    def __init__(self, settings: Settings, milvus: mv.Milvus,
                 db: Callable[[], psycopg.Connection], writer: Writer, target: Target,
                 projects: bool, users: bool,
                 on_written: Callable[[dict, Written], None] = lambda wanted, written: None):
        self.settings, self.milvus, self.db, self.writer = settings, milvus, db, writer
        self.encoder, self.on_written = target.encoder, on_written
        self.version = target.encoder.version
        self.projects = target.name
        self.users = contract.collection_name(settings, contract.USERS, self.version)
        self.build_projects, self.build_users = projects, users and self._users_possible()
        self.after = -1  # keyset cursor over projects.project_id
        # The highest id when stream writes began to reach this collection: any project
        # above it came later, and the stream writes it. Paging past it would chase new
        # projects for as long as they come faster than a fill step writes them.
        self.upto = -1
        self.user_vectors, self.user_ids = np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        self.user_rows = 0  # users written so far
        self.next_load_check = 0.0
        self.pace = 0.0  # projects/s of recent fill steps
        self.sealed: dict[str, int] = {}  # rows per collection when filling ended
        self.images, self.embed_seconds = 0, 0.0
        self.started = self.filled_at = time.monotonic()
        self.phase = "fill"

    # -- what to build ---------------------------------------------------------------

    def _users_possible(self) -> bool:
        if self.encoder.feature != "head":
            log.info("CNN v%d serves its penultimate layer (dim %d), not factor space: "
                     "no users collection for it", self.version, self.encoder.dim)
        return self.encoder.feature == "head"

    def start(self) -> None:
        if self.build_projects:
            mv.create_fresh(self.milvus, self.projects, contract.project_schema(self.encoder.dim))
            # Loaded from the start: the writer asks which state versions a collection
            # holds before embedding, and Milvus answers queries on loaded collections only.
            mv.request_index_and_load(self.milvus, self.settings, self.projects)
            self.phase = "prepare"
        if self.build_users:
            users = self._users()
            if users is not None:
                self.user_vectors, self.user_ids = users
                mv.create_fresh(self.milvus, self.users, contract.user_schema(self.encoder.dim))
            else:
                self.build_users = False
        if self.build_projects or self.build_users:
            log.info("backfill of v%d started: projects %s, users %s", self.version,
                     self.build_projects, self.build_users)

    def _users(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Users' factors of the version this CNN learned from, L2-normalized like the
        project vectors, so a user's vector searches the projects they would like."""
        version_id = self.encoder.version_row.get("factor_version_id") or self.encoder.meta.get(
            "factor_version")
        version = factor_version(self.db(), int(version_id)) if version_id else None
        if version is None:
            log.warning("CNN v%d names no readable factor version: no users collection",
                        self.version)
            return None
        try:
            factors = load_factors(self.settings.data_dir, version)
        except (OSError, ValueError) as error:
            log.warning("factor version %s unreadable (%s): no users collection", version_id,
                        error)
            return None
        if factors.user_factors.shape[1] != self.encoder.dim:
            log.warning("factor version %s has k=%d but CNN v%d outputs %d: no users "
                        "collection", version_id, factors.user_factors.shape[1], self.version,
                        self.encoder.dim)
            return None
        return normalized_users(factors.user_factors, factors.user_ids)

    def targets(self) -> list[Target]:
        """Collections stream writes must also reach while this backfill runs: from the
        first fill step on (pages read after a change include it anyway)."""
        if not self.build_projects or self.phase == "prepare":
            return []
        return [Target(self.projects, self.encoder)]

    # -- steps -----------------------------------------------------------------------

    def step(self) -> bool:
        """One unit of work; True once the collections are loaded and ready to verify."""
        if self.phase == "prepare" and self._loaded_now():
            self._begin_fill()
        elif self.phase == "fill":
            if not self._fill_step():
                self._request_load()
        elif self.phase == "loading" and time.monotonic() >= self.next_load_check:
            self.next_load_check = time.monotonic() + 0.25  # do not hammer Milvus
            if all(self._ready(name) for name in self._names()):
                self.phase = "ready"
        return self.phase == "ready"

    def _begin_fill(self) -> None:
        # Read after targets() names this collection: the stream writes what comes next.
        self.phase = "fill"
        self.upto = states.last_id(self.db())

    def _loaded_now(self) -> bool:
        if time.monotonic() < self.next_load_check:
            return False
        self.next_load_check = time.monotonic() + 0.1
        return mv.ensure_loading(self.milvus, self.projects) == "Loaded"

    def _ready(self, name: str) -> bool:
        """Loaded, and the sealed rows indexed: a swap must not leave queries scanning."""
        if mv.ensure_loading(self.milvus, name) != "Loaded":
            return False
        if not self.sealed[name] or mv.index_caught_up(self.milvus, name):
            return True
        return self._index_overdue(name)

    def _index_overdue(self, name: str) -> bool:
        """Past COFEAT_EMBED_INDEX_WAIT_S the swap goes ahead unindexed: an index that never
        reports caught up (every sealed row deleted and compacted away, a stuck index
        node) must not keep the new model from serving forever. The row count is still
        checked, and Milvus goes on indexing; queries only scan until it is done."""
        waited = time.monotonic() - self.filled_at
        if waited < self.settings.embed_index_wait_s:
            return False
        log.warning("%s: index not caught up after %.0f s (COFEAT_EMBED_INDEX_WAIT_S): "
                    "swapping anyway; queries scan its unindexed rows until Milvus is done",
                    name, waited)
        metrics.INDEX_WAIT_EXCEEDED.inc()
        return True

    def _names(self) -> list[str]:
        return ([self.projects] if self.build_projects else []) + (
            [self.users] if self.build_users else [])

    def _fill_step(self) -> bool:
        """Write one chunk; False when there is nothing left to write."""
        started = time.monotonic()
        projects = self._fill(self._chunk())
        if projects:
            self._pace(projects, time.monotonic() - started)
        return projects is not None

    def _fill(self, chunk: int) -> int | None:
        """Up to `chunk` projects, or one insert of users; returns the projects read, None
        when nothing is left."""
        if self.build_projects and self.after is not None:
            page = states.live_page(self.db(), self.after, chunk, self.upto)
            self.write({state.project_id: state for state in page})
            # Only after the write: a failed step is retried from the same place.
            self.after = page[-1].project_id if page else None
            return len(page)
        if self.build_users and self.user_rows < len(self.user_ids):
            part = slice(self.user_rows, self.user_rows + self.settings.embed_insert_rows)
            rows = user_rows(self.user_vectors[part], self.user_ids[part], self.version)
            mv.upsert(self.milvus, [self.users], rows, self.settings.embed_insert_rows)
            self.user_rows += len(rows)
            return 0
        return None

    def write(self, wanted: dict[int, states.State | None]) -> None:
        written = self.writer.apply(wanted, self.targets())
        self.images += written.embedded
        self.embed_seconds += written.seconds
        metrics.IMAGES.labels("backfill").inc(written.embedded)
        self.on_written(wanted, written)

    def _chunk(self) -> int:
        """Projects for the next step: COFEAT_EMBED_BACKFILL_STEP_S of work at the recent
        pace. Stream events wait behind a step, and the pace varies tenfold with what else
        runs on the cores (CNN training, ingest), so a fixed count cannot bound the wait."""
        limit = self.settings.embed_backfill_chunk
        if not self.pace:
            return min(limit, self.settings.embed_batch_size)  # a first, short measurement
        return max(1, min(limit, int(self.pace * self.settings.embed_backfill_step_s)))

    def _pace(self, projects: int, seconds: float) -> None:
        """Projects per second of fill steps, reading, embedding and writing included."""
        pace = projects / max(seconds, 1e-3)
        self.pace = pace if not self.pace else (self.pace + pace) / 2

    def _request_load(self) -> None:
        rows = mv.count(self.milvus, self.projects) if self.build_projects else 0
        self.sealed = {self.projects: rows, self.users: self.user_rows}
        for name in self._names():
            mv.request_index_and_load(self.milvus, self.settings, name)
        self.phase, self.filled_at = "loading", time.monotonic()
        log.info("backfill of v%d filled (%d projects, %d users): building index and loading",
                 self.version, rows, self.user_rows)

    # -- the swap --------------------------------------------------------------------

    def verify(self) -> None:
        if self.build_projects:
            self._verify_projects()
        if self.build_users:
            in_milvus = mv.count(self.milvus, self.users)
            if in_milvus != self.user_rows:
                raise BackfillFailed(f"{self.users} holds {in_milvus} rows, wrote "
                                     f"{self.user_rows}")

    def _verify_projects(self) -> None:
        """Exactly what Postgres wants, id by id. What differs is repaired, then looked at
        again: a project whose Postgres state stayed put must now be right. One that moved
        is in flight, and the stream writes it to both collections."""
        drift = reconcile.compare(self.milvus, self.db, self.projects, self.version)
        if drift:
            log.info("%s differs from Postgres before the swap (%s): repairing",
                     self.projects, drift.summary())
            self.write(states.wanted_for(self.db(), drift.ids()))
            left = reconcile.confirm(self.milvus, self.db, self.projects, self.version, drift)
            if left:
                raise BackfillFailed(f"{self.projects} still differs from Postgres after a "
                                     f"repair: {left.summary()}")
        log.info("verified %s against Postgres: no missing, extra or stale row%s",
                 self.projects, f" ({len(drift)} repaired)" if drift else "")

    def swap(self) -> list[str]:
        """Move the aliases (users first, then projects); returns the collections left."""
        left = []
        if self.build_users:
            left.append(mv.point_alias(self.milvus, contract.alias(self.settings,
                                                                   contract.USERS), self.users))
            metrics.SWAPS.labels("users").inc()
        elif self.build_projects:
            # A users collection of another model would be a different space: none is
            # better than a wrong one.
            left.append(mv.drop_alias(self.milvus, contract.alias(self.settings,
                                                                  contract.USERS)))
        if self.build_projects:
            left.append(mv.point_alias(self.milvus, contract.alias(
                self.settings, contract.PROJECTS), self.projects))
            metrics.SWAPS.labels("projects").inc()
        self._report()
        return [name for name in left if name]

    def _report(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.images / self.embed_seconds if self.embed_seconds else 0.0
        metrics.IMAGES_PER_SECOND.labels("backfill").set(rate)
        log.info("backfill of v%d done in %.1f s: %d images at %.0f images/s (model), "
                 "%d users; filling %.1f s, index + load + check %.1f s", self.version,
                 elapsed, self.images, rate, self.user_rows, self.filled_at - self.started,
                 time.monotonic() - self.filled_at)

    def abandon(self) -> None:
        """Drop what was built (nothing is aliased yet); a new backfill starts over."""
        for name in self._names():
            if not mv.aliased(self.milvus, name):
                mv.drop(self.milvus, name)


def normalized_users(user_factors: np.ndarray,
                     user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalized user factors; users with a zero vector (no signal) are left out, as
    cosine is undefined for them."""
    vectors = np.asarray(user_factors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    keep = norms > 0
    return vectors[keep] / norms[keep, None], np.asarray(user_ids, dtype=np.int64)[keep]


def user_rows(vectors: np.ndarray, user_ids: np.ndarray, version: int) -> list[dict]:
    return [{"user_id": int(u), "embedding": v.tolist(), "model_version": version}
            for u, v in zip(user_ids, vectors, strict=True)]
