"""Filling the collections of a new CNN version, in steps, then one alias move per kind.

The service interleaves `step()` with stream batches, so queries keep being served from
the old collection and new events keep flowing. Stream writes go to both collections
while a backfill runs; `touched` remembers what the stream wrote here, and a Postgres row
is skipped when the stream already wrote a state at least as new (ingest may lag behind
the embedder's own consumer, so Postgres can be older than the stream). The last minutes
of stream events are re-applied first for the same reason.

Before the alias moves, the row count must equal what was written (no lost write) and
match Postgres' live, unparked projects within the number of projects that changed
meanwhile, in our stream or in Postgres (exactly, on a quiet stream).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import psycopg

from services.embedder import collections as mv
from services.embedder import failures, metrics
from services.embedder.encode import Encoder, Item, Result
from shared import milvus as contract
from shared.events import ProjectEvent
from shared.factors import factor_version, load_factors
from shared.retry import describe
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")
States = dict[int, tuple[int, str]]  # project_id -> (state ts, image uri) in a collection


class BackfillFailed(RuntimeError):
    pass


class Backfill:
    """Builds `<kind>_v<model>` for the kinds whose alias is not on this version yet."""

    def __init__(self, settings: Settings, milvus: mv.Milvus,
                 db: Callable[[], psycopg.Connection],
                 encoder: Encoder, projects: bool, users: bool,
                 replay: list[ProjectEvent] = ()):
        self.settings, self.milvus, self.db, self.encoder = settings, milvus, db, encoder
        self.version = encoder.version
        self.projects = contract.collection_name(settings, contract.PROJECTS, self.version)
        self.users = contract.collection_name(settings, contract.USERS, self.version)
        self.build_projects, self.build_users = projects, users and self._users_possible()
        self.replay = list(replay)
        self.start_seq = 0  # project_events.seq when the backfill started
        self.after = -1  # keyset cursor over projects.project_id
        self.touched: dict[int, int] = {}  # project_id -> ts of the state written here
        self.states: States = {}  # project_id -> (ts, image) of each row written here
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
        self.start_seq = failures.last_event_seq(self.db())
        if self.build_projects:
            mv.create_fresh(self.milvus, self.projects, contract.project_schema(self.encoder.dim))
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

    def targets(self) -> list[str]:
        """Collections stream writes must also reach while this backfill runs."""
        return [self.projects] if self.build_projects else []

    # -- steps -----------------------------------------------------------------------

    def step(self) -> bool:
        """One unit of work; True once the collections are loaded and ready to verify."""
        if self.phase == "fill":
            if not self._fill_step():
                self._request_load()
        elif self.phase == "loading" and time.monotonic() >= self.next_load_check:
            self.next_load_check = time.monotonic() + 0.25  # do not hammer Milvus
            if all(self._ready(name) for name in self._names()):
                self.phase = "ready"
        return self.phase == "ready"

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
        if self.build_projects and self.replay:
            events = self.replay[:chunk]
            self._replay(events)
            self.replay = self.replay[chunk:]
            return len(events)
        if self.build_projects and self.after is not None:
            items = failures.live_page(self.db(), self.after, chunk,
                                       self.settings.embed_max_attempts)
            self._write_items([i for i in items
                               if self.touched.get(i.project_id, -1) < i.ts_ms])
            # Only after the write: a failed step is retried from the same place.
            self.after = items[-1].project_id if items else None
            return len(items)
        if self.build_users and self.user_rows < len(self.user_ids):
            part = slice(self.user_rows, self.user_rows + self.settings.embed_insert_rows)
            rows = user_rows(self.user_vectors[part], self.user_ids[part], self.version)
            mv.upsert(self.milvus, [self.users], rows, self.settings.embed_insert_rows)
            self.user_rows += len(rows)
            return 0
        return None

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
        self.sealed = {self.projects: len(self.states), self.users: self.user_rows}
        for name in self._names():
            mv.request_index_and_load(self.milvus, self.settings, name)
        self.phase, self.filled_at = "loading", time.monotonic()
        log.info("backfill of v%d filled (%d projects, %d users): building index and loading",
                 self.version, len(self.states), self.user_rows)

    def _replay(self, events: list[ProjectEvent]) -> None:
        fresh = [e for e in events if self.touched.get(e.project_id, -1) < e.ts_ms]
        deleted = {e.project_id: e.ts_ms for e in fresh if e.type == "deleted"}
        mv.delete(self.milvus, [self.projects], list(deleted))
        self.note([], [], deleted)
        published = failures.published_ms(self.db(), [e.project_id for e in fresh])
        self._write_items([event_item(e, published) for e in fresh if e.type != "deleted"])
        self.touch({e.project_id: e.ts_ms for e in fresh})

    def _write_items(self, items: list[Item]) -> None:
        result = embed_and_record(self.encoder, self.db(), items,
                                  self.settings.embed_max_attempts)
        # A failed image is the retry step's now; this state is handled here, so an older
        # Postgres row must not be written over a later retry's row, and the check before
        # the swap allows for it.
        self.touch({item.project_id: item.ts_ms for item, _ in result.failed})
        self.images += len(items)
        self.embed_seconds += result.seconds
        metrics.IMAGES.labels("backfill").inc(len(items))
        # Upserts even into a fresh collection: a call that timed out may still have been
        # applied, and Milvus does not deduplicate inserted primary keys.
        refused = mv.upsert(self.milvus, [self.projects], result.rows,
                            self.settings.embed_insert_rows)
        if refused:
            # Refused for their data: parked, so the count check leaves them out.
            self.park([(item, f"milvus refused: {describe(error)}")
                       for item in items for row, error in refused
                       if row["project_id"] == item.project_id])
            ids = {row["project_id"] for row, _ in refused}
            result.rows = [r for r in result.rows if r["project_id"] not in ids]
        self.record(items, result.rows)
        metrics.BACKFILL_ROWS.set(len(self.states))

    def park(self, failed: list[tuple[Item, str]]) -> None:
        db = self.db()
        with db.transaction(), db.cursor() as cur:
            failures.record(cur, failed)
            attempts = failures.park(cur, [item.project_id for item, _ in failed],
                                     self.settings.embed_max_attempts)
        log_failures(failed, attempts, self.settings.embed_max_attempts)

    def note(self, items: list[Item], rows: list[dict], deleted: dict[int, int]) -> None:
        """The stream wrote `rows` (of `items`) and deleted these ({project_id: event ts})
        in our collection."""
        self.record(items, rows)
        ts = {item.project_id: item.ts_ms for item in items}
        self.touch({row["project_id"]: ts[row["project_id"]] for row in rows})
        self.touch(deleted)
        for project_id in deleted:
            self.states.pop(project_id, None)

    def record(self, items: list[Item], rows: list[dict]) -> None:
        """The states behind the rows just written, for `unwritten`."""
        done = {row["project_id"] for row in rows}
        self.states.update({item.project_id: (item.ts_ms, item.image_uri) for item in items
                            if item.project_id in done})

    def touch(self, states: dict[int, int]) -> None:
        """States at least this new were handled here (written, deleted, or failed and
        parked for retry): an older Postgres row must not overwrite them."""
        for project_id, ts in states.items():
            self.touched[project_id] = max(ts, self.touched.get(project_id, ts))

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
        in_milvus = mv.count(self.milvus, self.projects)
        if in_milvus != len(self.states):
            raise BackfillFailed(f"{self.projects} holds {in_milvus} rows but {len(self.states)}"
                                 " were written: a write was lost")
        expected = failures.expected_count(self.db(), self.settings.embed_max_attempts)
        # Projects changed meanwhile, by our stream or by ingest, may legitimately differ
        # (the two consume the topic independently); every other one must match.
        moving = set(self.touched) | failures.changed_since(self.db(), self.start_seq)
        if abs(in_milvus - expected) > len(moving):
            raise BackfillFailed(
                f"{self.projects} holds {in_milvus} rows, Postgres has {expected} live unparked"
                f" projects and only {len(moving)} changed meanwhile")
        log.info("verified %s: %d rows (Postgres: %d live unparked, %d changed by the "
                 "stream meanwhile, %d in all)", self.projects, in_milvus, expected,
                 len(self.touched), len(moving))

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


def unwritten(items: list[Item], states: States | None) -> list[Item]:
    """The items whose state a collection does not hold yet. The stream re-reads events a
    backfill already embedded from Postgres (a first model going live after minutes of
    backlog, a stream that joined mid-backfill): embedding each again delayed the new
    events behind them by seconds. A newer state written there wins as well."""
    if not states:
        return items

    def held(item: Item) -> bool:
        state = states.get(item.project_id)
        return state is not None and (state[0] > item.ts_ms
                                      or state == (item.ts_ms, item.image_uri))

    return [item for item in items if not held(item)]


def event_item(event: ProjectEvent, published: dict[int, int]) -> Item:
    first = min(published.get(event.project_id, event.ts_ms), event.ts_ms)
    return Item(event.project_id, event.owner_id, first, event.image_uri, event.ts_ms)


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


def embed_and_record(encoder: Encoder, db: psycopg.Connection, items: list[Item],
                     max_attempts: int) -> Result:
    """Embed; record each failed image once and leave it to the embedder's retry step,
    which tries it again after COFEAT_EMBED_RETRY_INTERVAL_S. Retrying at once, three times
    back to back, parked images for good over a storage blip of a second."""
    result = encoder.embed(items)
    with db.transaction(), db.cursor() as cur:
        attempts = failures.record(cur, result.failed)
        failures.clear(cur, [row["project_id"] for row in result.rows])
    if result.failed:
        log_failures(result.failed, attempts, max_attempts)
    return result


def log_failures(failed: list[tuple[Item, str]], attempts: dict[int, int],
                 max_attempts: int) -> None:
    metrics.IMAGE_FAILURES.inc(len(failed))
    for item, reason in failed:
        count = attempts[item.project_id]
        parked = count >= max_attempts
        if parked:
            metrics.PARKED.inc()
        if count == 0:
            log.warning("project %d: image %s unavailable (%s): retried later, never parked "
                        "for that", item.project_id, item.image_uri, reason)
            continue
        log.warning("project %d: image %s unreadable (%s), attempt %d of %d%s",
                    item.project_id, item.image_uri, reason, count, max_attempts,
                    ": parked" if parked else "")
