"""The embedder loop: model check, one stream batch, one backfill step, retries, drops.

Everything runs in one thread, in that order, so stream writes and backfill writes never
race: a backfill is a sequence of short steps between stream batches (each about
COFEAT_EMBED_BACKFILL_STEP_S long, which bounds how long a new project waits), and the alias
moves right after its verification, with no stream write in between. Only the replica that
holds the leader lock runs this loop (services/embedder/leader.py); it stops at the next
turn after losing the lock, and asks Postgres again right before an alias swap or a drop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg

from services.embedder import collections as mv
from services.embedder import failures, metrics
from services.embedder.backfill import (
    Backfill,
    BackfillFailed,
    States,
    event_item,
    log_failures,
    unwritten,
)
from services.embedder.encode import Encoder, Item
from services.embedder.stream import Polled, Recent, Stream, latest_per_project
from shared import milvus as contract
from shared import retry
from shared.cnn import cnn_version, current_cnn_version
from shared.db.connect import connect
from shared.db.locks import SessionLock
from shared.events import ProjectEvent
from shared.images import ImageReader
from shared.logs import bind
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")
T = TypeVar("T")
BACKFILL_POLL_MS = 50  # a fetch round trip to a broker on busy cores


class Embedder:
    def __init__(self, settings: Settings, drain: bool = False,
                 lock: SessionLock | None = None):
        self.settings, self.drain = settings, drain
        self.stopping = False
        self.failed = False
        self.lock = lock  # None: no leader election (tests of the loop alone)
        self.lost = False  # the leader lock is gone: another replica may be writing
        self.milvus = mv.Milvus(settings, self.halted, self.wait)
        self.db_outage = retry.Outage("database", settings.embed_retry_max_s, base_s=0.1,
                                      log=log)
        self.conn: psycopg.Connection | None = None
        self.stream: Stream | None = None
        self.encoders: dict[int, Encoder] = {}
        self.reader = ImageReader.from_settings(settings)  # one per process: pools, cache
        self.live: Encoder | None = None  # the model behind the projects alias
        self.live_collection: str | None = None
        # What the backfill behind the live collection wrote, until the stream catches up
        # with the backlog it re-reads (see backfill.unwritten).
        self.live_states: States | None = None
        # Events produced before any model was live could not be searchable in seconds:
        # freshness counts those produced after this (0: a model was live when we started).
        self.searchable_since_ms: float | None = None
        self.backfill: Backfill | None = None
        self.users_unavailable: int | None = None  # version whose users cannot be built
        self.retirement = mv.Retirement(settings.embed_drop_grace_s)
        self.recent = Recent(settings.embed_recent_window_s)
        self.next_model_check = self.next_retry = 0.0
        self.recoveries_seen = 0
        self.refused: set[int] = set()  # project ids Milvus refused for their data: parked
        self.meter = Meter()

    # -- database ------------------------------------------------------------------------

    def db(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = connect(self.settings, autocommit=True)
        return self.conn

    def with_db(self, action: Callable[[psycopg.Connection], T]) -> T:
        """Run `action` until the database takes it (each action is one transaction)."""
        while True:
            try:
                result = action(self.db())
                self.db_outage.recovered()
                return result
            except psycopg.Error as error:
                self.db_failed(error)

    def db_failed(self, error: psycopg.Error) -> None:
        metrics.DB_ERRORS.inc()
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None
        if self.wait(self.db_outage.failed(error)):
            raise mv.Stopped

    def wait(self, seconds: float) -> bool:
        """A retry's wait; True if halted meanwhile. Once the stream runs, waiting polls it
        with the partitions paused, so an outage does not cost the group membership."""
        if self.stream is not None:
            return self.stream.idle(seconds, self.halted)
        return mv.sleep_unless(self.halted, seconds)

    # -- models and collections ----------------------------------------------------------

    def encoder(self, row: dict) -> Encoder:
        if row["id"] not in self.encoders:
            self.encoders[row["id"]] = Encoder(self.settings, row, self.reader)
        return self.encoders[row["id"]]

    def discover(self) -> None:
        """Which collection the projects alias serves, and leftovers to retire."""
        alias = contract.alias(self.settings, contract.PROJECTS)
        target = mv.alias_target(self.milvus, alias)
        version = mv.version_of(self.settings, contract.PROJECTS, target) if target else None
        row = self.with_db(lambda conn: cnn_version(conn, version)) if version else None
        try:
            live = self.encoder(row) if row is not None else None
        except (OSError, ValueError, RuntimeError) as error:
            log.error("cannot load CNN v%s behind alias %s (%s): streaming waits for the "
                      "next backfill", version, alias, error)
            live = row = None
        if live is not None:
            self.live, self.live_collection = live, target
            self.searchable_since_ms = 0.0
            bind(model_version=live.version)
            metrics.live_model(version)
            log.info("serving %s (CNN v%d) through alias %s", target, version, alias)
        elif target:
            log.warning("alias %s is on %s, which names no CNN version: it will be replaced",
                        alias, target)
        mv.schedule_leftovers(self.milvus, self.settings, self.retirement, keep=set())

    def users_version(self) -> int | None:
        target = mv.alias_target(self.milvus, contract.alias(self.settings, contract.USERS))
        return mv.version_of(self.settings, contract.USERS, target) if target else None

    def check_model(self) -> None:
        if time.monotonic() < self.next_model_check:
            return
        self.next_model_check = time.monotonic() + self.settings.embed_model_poll_s
        row = self.with_db(current_cnn_version)
        if row is None or (self.backfill and self.backfill.version == row["id"]):
            return
        projects = self.live is None or self.live.version != row["id"]
        users = projects or (self.users_unavailable != row["id"]
                             and self.users_version() != row["id"])
        # Abandoning a backfill and starting one drop collections: only as the leader.
        self.confirm_leading()
        if self.backfill is not None:
            log.info("CNN v%d superseded v%d while it was being backfilled", row["id"],
                     self.backfill.version)
            self.backfill.abandon()
            self.backfill = None
        if projects or users:
            try:
                self.start_backfill(row, projects, users)
            except (OSError, ValueError, RuntimeError) as error:
                # An unreadable artifact must not stop the stream on the live model.
                log.error("cannot backfill CNN v%d, retrying in %.0f s: %s", row["id"],
                          self.settings.embed_model_poll_s, error)
                self.failed = True

    def start_backfill(self, row: dict, projects: bool, users: bool) -> None:
        backfill = Backfill(self.settings, self.milvus, self.db, self.encoder(row),
                            projects, users, replay=self.recent.snapshot())
        for name in (backfill.projects, backfill.users):
            self.retirement.cancel(name)
        backfill.start()
        if backfill.build_projects or backfill.build_users:
            self.backfill = backfill
        else:
            self.users_unavailable = backfill.version

    def backfill_step(self) -> None:
        if self.backfill is None or not self.backfill.step():
            return
        try:
            self.backfill.verify()
        except BackfillFailed as error:
            log.error("backfill of v%d failed its check, starting over later: %s",
                      self.backfill.version, error)
            self.confirm_leading()  # before the drop, like every other
            self.backfill.abandon()
            self.backfill, self.failed = None, True
            return
        self.confirm_leading()
        for name in self.backfill.swap():
            self.retirement.schedule(name)
        if self.backfill.build_projects:
            if self.live is None:
                self.searchable_since_ms = time.time() * 1000
                log.info("first model live: freshness is measured from now on")
            self.live, self.live_collection = self.backfill.encoder, self.backfill.projects
            self.live_states = self.backfill.states
            metrics.live_model(self.live.version)
            bind(model_version=self.live.version)
            self.encoders = {self.live.version: self.live}
        self.backfill = None

    def reload_after_outage(self) -> None:
        """Milvus 2.3.5 loads the aliased collections again after a restart; should a server
        not, queries would fail until the next swap, so ask for it."""
        if self.milvus.recoveries == self.recoveries_seen:
            return
        self.recoveries_seen = self.milvus.recoveries
        for kind in (contract.PROJECTS, contract.USERS):
            target = mv.alias_target(self.milvus, contract.alias(self.settings, kind))
            if target:
                mv.ensure_loading(self.milvus, target)

    def writers(self) -> list[tuple[Encoder, list[str], bool, States | None]]:
        """(model, collections, is the backfill, states they hold) for every collection
        writes must reach."""
        out = []
        if self.live is not None:
            out.append((self.live, [self.live_collection], False, self.live_states))
        if self.backfill is not None and self.backfill.targets():
            out.append((self.backfill.encoder, self.backfill.targets(), True,
                        self.backfill.states))
        return out

    # -- writing -------------------------------------------------------------------------

    def upsert_items(self, items: list[Item], phase: str) -> list[tuple[Item, str]]:
        """Embed with every writer's model and upsert; returns the failed items (those Milvus
        refused are in `self.refused` too: they are parked at once, not retried)."""
        failed: dict[int, tuple[Item, str]] = {}
        for encoder, names, is_backfill, states in self.writers():
            todo = unwritten(items, states)
            metrics.ALREADY_WRITTEN.inc(len(items) - len(todo))
            result = encoder.embed(todo)
            refused = mv.upsert(self.milvus, names, result.rows,
                                self.settings.embed_insert_rows)
            by_id = {item.project_id: item for item in todo}
            for row, error in refused:
                failed[row["project_id"]] = (by_id[row["project_id"]],
                                             f"milvus refused: {retry.describe(error)}")
                self.refused.add(row["project_id"])
            result.rows = [r for r in result.rows if r["project_id"] not in failed]
            failed.update({item.project_id: (item, why) for item, why in result.failed})
            if is_backfill:
                self.backfill.note(todo, result.rows, {})
                self.backfill.touch({i.project_id: i.ts_ms for i, _ in result.failed})
            else:
                self.meter.images(len(todo), result.seconds)
                metrics.IMAGES.labels(phase).inc(len(todo))
        return list(failed.values())

    def delete_ids(self, deleted: list[ProjectEvent]) -> None:
        ids = [e.project_id for e in deleted]
        for _, names, is_backfill, _ in self.writers():
            mv.delete(self.milvus, names, ids)
            if is_backfill:
                self.backfill.note([], [], {e.project_id: e.ts_ms for e in deleted})

    def apply(self, polled: Polled) -> None:
        """One batch: Milvus first, then failures and offsets in one transaction."""
        events = latest_per_project(polled.events, self.recent)
        deleted = [e for e in events if e.type == "deleted"]
        upserts = [e for e in events if e.type != "deleted"]
        published = self.with_db(lambda conn: failures.published_ms(
            conn, [e.project_id for e in upserts]))
        failed = self.upsert_items([event_item(e, published) for e in upserts], "stream")
        self.delete_ids(deleted)
        failed_ids = {item.project_id for item, _ in failed}
        done = [e.project_id for e in events if e.project_id not in failed_ids]
        attempts = self.with_db(lambda conn: commit(conn, self.settings, polled.next_offsets,
                                                    failed, done, self.take_refused()))
        if failed:
            log_failures(failed, attempts, self.settings.embed_max_attempts)
        self.stream.done(polled)
        self.recent.add(events)
        observe(events, failed_ids, polled.produced_ms, self.searchable_since_ms)

    def take_refused(self) -> list[int]:
        refused, self.refused = sorted(self.refused), set()
        return refused

    def stream_step(self) -> None:
        if self.stream is None:
            self.stream = Stream(self.settings)
        timeout = self.settings.embed_poll_timeout_ms
        if self.backfill is not None and self.stream.joined:
            # Backfill steps wait, but a fetch the broker held through a step comes back
            # empty, and the events that came meanwhile need one more round trip: a shorter
            # poll (10 ms) left them for the next step, doubling their wait.
            timeout = min(timeout, BACKFILL_POLL_MS)
        polled = self.stream.poll(timeout)
        if polled.next_offsets:
            self.apply(polled)
        if self.live_states is not None and self.stream.caught_up():
            self.live_states = None  # the backlog a backfill covered is behind us
        self.stream.rewind_truncated()
        self.stream.report_lag()

    def retry_step(self) -> None:
        interval = 0.0 if self.drain else self.settings.embed_retry_interval_s
        if time.monotonic() < self.next_retry or not self.writers():
            return
        self.next_retry = time.monotonic() + min(interval, 5.0)
        # A drain retries permanent failures at once (nothing else is left to do), but an
        # unavailable storage only at the configured interval.
        items = self.with_db(lambda conn: failures.due_retries(
            conn, self.settings.embed_max_attempts, interval, self.settings.embed_backfill_chunk,
            transient_interval_s=self.settings.embed_retry_interval_s))
        if not items:
            return
        failed = self.upsert_items(items, "retry")
        failed_ids = {item.project_id for item, _ in failed}
        done = [i.project_id for i in items if i.project_id not in failed_ids]
        attempts = self.with_db(lambda conn: commit(conn, self.settings, {}, failed, done,
                                                    self.take_refused()))
        log_failures(failed, attempts, self.settings.embed_max_attempts)
        if done:
            log.info("retried %d projects successfully", len(done))

    def retries_pending(self) -> bool:
        """Permanent failures not parked yet; images waiting for an unavailable storage
        do not hold a drain up (the running embedder retries them)."""
        return bool(self.with_db(lambda conn: failures.due_retries(
            conn, self.settings.embed_max_attempts, 0.0, 1, permanent_only=True)))

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.discover()
            while not self.halted():
                self.check_model()
                if not self.writers():
                    if self.drain:
                        log.info("no promoted CNN version and no collection: nothing to do")
                        break
                    mv.sleep_unless(self.halted, 1.0)
                    continue
                self.step()
                if self.drain and self.drained():
                    log.info("backfills done and caught up on every partition; draining done")
                    self.report_waiting()
                    break
        except mv.Stopped:
            if not self.lost:
                log.info("stopped while waiting for a server; the unacknowledged batch will "
                         "be replayed")
        finally:
            self.close()
        self.meter.summary()
        return 1 if (self.drain and self.failed) else 0

    def step(self) -> None:
        try:
            for part in (self.stream_step, self.backfill_step, self.retry_step,
                         self.drop_retired, self.reload_after_outage):
                timed(part)
        except psycopg.Error as error:
            self.db_failed(error)  # retried on the next turn: every write is idempotent
        self.meter.tick()

    def drop_retired(self) -> None:
        if self.retirement.any_due():
            self.confirm_leading()
        self.retirement.drop_due(self.milvus)

    def drained(self) -> bool:
        if self.failed:
            return True
        return (self.backfill is None and self.stream is not None and self.stream.caught_up()
                and not self.retries_pending())

    def report_waiting(self) -> None:
        waiting = self.with_db(failures.waiting_for_storage)
        if waiting:
            log.warning("%d images wait for their storage to answer again (transient "
                        "failures); the running embedder retries them", waiting)

    def stop(self, *_args) -> None:
        self.stopping = True

    # -- leadership ----------------------------------------------------------------------

    def leading(self, force: bool = False) -> bool:
        """False from the moment the leader lock is found gone (at most one check a second
        unless `force`d): its session ended, so a standby may have taken over."""
        if self.lock is None or self.lost:
            return not self.lost
        if not self.lock.held(force):
            self.lost = True
            log.error("lost the embedder lock (its database session ended): stepping down, "
                      "no more writes; unacknowledged events will be replayed by the leader")
        return not self.lost

    def halted(self) -> bool:
        """Stop the loop and every retry wait: asked to stop, or no longer the leader."""
        return self.stopping or not self.leading()

    def confirm_leading(self) -> None:
        # Alias moves and drops cannot be replayed harmlessly: ask Postgres, not the cache.
        if not self.leading(force=True):
            raise mv.Stopped

    def close(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(Exception):
                self.stream.close()
        self.milvus.close()
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()


def timed(part: Callable[[], object], slow_s: float = 5.0) -> None:
    # A slow part delays every stream event behind it: say which one it was.
    started = time.monotonic()
    part()
    if time.monotonic() - started > slow_s:
        log.warning("slow loop step: %s took %.1f s", part.__name__,
                    time.monotonic() - started)


def commit(conn: psycopg.Connection, settings: Settings, next_offsets: dict,
           failed: list[tuple[Item, str]], done: list[int],
           refused: list[int] = ()) -> dict[int, int]:
    """Failures (those Milvus refused parked at once: retrying cannot help), successes and
    the offsets after them, in one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        attempts = failures.record(cur, failed)
        attempts.update(failures.park(cur, refused, settings.embed_max_attempts))
        failures.clear(cur, done)
        failures.store_offsets(cur, settings.embed_group, next_offsets)
    return attempts


def observe(events: list[ProjectEvent], failed_ids: set[int], produced_ms: dict[str, int],
            searchable_since_ms: float | None) -> None:
    now_ms = time.time() * 1000
    for event in events:
        if event.project_id in failed_ids:
            metrics.EVENTS.labels("failed").inc()
            continue
        metrics.EVENTS.labels("deleted" if event.type == "deleted" else "upserted").inc()
        produced = produced_ms.get(event.event_id) or 0
        if searchable_since_ms is not None and produced > searchable_since_ms:
            metrics.FRESHNESS.observe(max(0.0, now_ms - produced) / 1000)


class Meter:
    """Stream images/s in the log and as a gauge every few seconds."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.started = self.last = time.monotonic()
        self.count, self.seconds, self.total = 0, 0.0, 0

    def images(self, count: int, seconds: float) -> None:
        self.count += count
        self.seconds += seconds
        self.total += count

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        if self.count:
            rate = self.count / self.seconds if self.seconds else 0.0
            metrics.IMAGES_PER_SECOND.labels("stream").set(rate)
            log.info("stream: %d images in %.0f s, %.0f images/s while embedding",
                     self.count, now - self.last, rate)
        self.last, self.count, self.seconds = now, 0, 0.0

    def summary(self) -> None:
        log.info("stopped: %d stream images in %.1f s", self.total,
                 time.monotonic() - self.started)
