"""The embedder loop: what runs when. Each job lives in its own module:

- stream.py: project events -> the projects Postgres says changed -> the writer;
- lifecycle.py: which model serves, backfills of new ones (backfill.py), alias swaps;
- failures.py: images retried after an interval, then parked;
- reconcile.py: the live collection compared with Postgres, drift repaired;
- writer.py: the one write path into Milvus, for all of them;
- warmup.py: new projects' first interactions folded into their vectors, in a collection
  of their own (the live one keeps the image vectors).

Everything runs in one thread, in turn, so writes never race: a backfill is a sequence of
short steps between stream batches (each about COFEAT_EMBED_BACKFILL_STEP_S long, which
bounds how long a new project waits), and the alias moves right after its check, with no
stream write in between. The stream is polled again (without waiting) after any other
part that took more than STREAM_AGAIN_AFTER_S, so an event waits behind one long part, not
behind a whole turn.

Only the replica that holds the leader lock runs this loop (leader.py); it stops at the
next turn after losing the lock, and asks Postgres again right before an alias swap or a
drop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import psycopg

from services.embedder import collections as mv
from services.embedder import failures, metrics, states
from services.embedder.database import Database
from services.embedder.lifecycle import Lifecycle
from services.embedder.reconcile import Reconciler
from services.embedder.stream import Stream
from services.embedder.warmup import WarmUp
from services.embedder.writer import Writer, Written
from shared.db.locks import SessionLock
from shared.images import ImageReader
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")
BACKFILL_POLL_MS = 50  # a fetch round trip to a broker on busy cores
STREAM_AGAIN_AFTER_S = 0.1  # a part this long is followed by another look at the stream


class Embedder:
    def __init__(self, settings: Settings, drain: bool = False,
                 lock: SessionLock | None = None):
        self.settings, self.drain = settings, drain
        self.stopping = False
        self.lock = lock  # None: no leader election (tests of the loop alone)
        self.lost = False  # the leader lock is gone: another replica may be writing
        self.milvus = mv.Milvus(settings, self.halted, self.wait)
        self.db = Database(settings, self.wait)
        self.writer = Writer(settings, self.milvus)
        self.lifecycle = Lifecycle(settings, self.milvus, self.db, self.writer,
                                   self.confirm_leading, self.record,
                                   ImageReader.from_settings(settings))  # pools, cache
        self.stream: Stream | None = None
        self.reconciler = Reconciler(settings, self.milvus, self.db, self.writer,
                                     lambda: self.lifecycle.live, lambda: self.stream,
                                     self.record)
        self.next_retry = 0.0
        self.warmup = WarmUp(settings, self.milvus, self.db, lambda: self.lifecycle.live,
                             self.confirm_leading)

    def record(self, wanted: dict, written: Written) -> None:
        failures.commit(self.db(), self.settings, written, wanted)

    def wait(self, seconds: float) -> bool:
        """A retry's wait; True if halted meanwhile. Once the stream runs, waiting polls it
        with the partitions paused, so an outage does not cost the group membership."""
        if self.stream is not None:
            return self.stream.source.idle(seconds, self.halted)
        return mv.sleep_unless(self.halted, seconds)

    # -- the jobs, in turn ---------------------------------------------------------------

    def stream_step(self) -> None:
        if self.stream is None:
            self.stream = Stream(self.settings, self.db, self.writer, self.lifecycle.targets,
                                 lambda: self.lifecycle.live_since_ms)
        timeout = self.settings.embed_poll_timeout_ms
        if self.lifecycle.backfill is not None and self.stream.source.joined:
            # Backfill steps wait, but a fetch the broker held through a step comes back
            # empty, and the events that came meanwhile need one more round trip: a shorter
            # poll (10 ms) left them for the next step, doubling their wait.
            timeout = min(timeout, BACKFILL_POLL_MS)
        self.stream.step(timeout)

    def stream_between(self) -> None:
        if self.stream is not None:
            self.stream.step(0)

    def retry_step(self) -> None:
        interval = 0.0 if self.drain else self.settings.embed_retry_interval_s
        if time.monotonic() < self.next_retry or not self.lifecycle.targets():
            return
        self.next_retry = time.monotonic() + min(interval, 5.0)
        # A drain retries permanent failures at once (nothing else is left to do), but an
        # unavailable storage only at the configured interval.
        ids = failures.due(self.db(), self.settings.embed_max_attempts, interval,
                           self.settings.embed_backfill_chunk,
                           transient_interval_s=self.settings.embed_retry_interval_s)
        if not ids:
            return
        # The image of exactly this state failed before: try it again.
        found = states.current(self.db(), ids)
        wanted = {pid: (s if s is not None and s.live else None)
                  for pid, s in ((pid, found.get(pid)) for pid in ids)}
        written = self.writer.apply(wanted, self.lifecycle.targets())
        self.record(wanted, written)
        if written.done(wanted):
            log.info("retried %d projects successfully", len(written.done(wanted)))

    def retries_pending(self) -> bool:
        """Permanent failures not parked yet; images waiting for an unavailable storage
        do not hold a drain up (the running embedder retries them)."""
        return bool(failures.due(self.db(), self.settings.embed_max_attempts, 0.0, 1,
                                 permanent_only=True))

    def report_waiting(self) -> None:
        waiting = failures.waiting_for_storage(self.db())
        if waiting:
            log.warning("%d images wait for their storage to answer again (transient "
                        "failures); the running embedder retries them", waiting)

    # -- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        self.db.run(lambda conn: self.lifecycle.discover())

    def run(self) -> int:
        try:
            self.start()
            while not self.halted() and not self.turn():
                pass
        except mv.Stopped:
            if not self.lost:
                log.info("stopped while waiting for a server; the unacknowledged batch will "
                         "be replayed")
        finally:
            self.close()
        return 1 if (self.drain and self.lifecycle.failed) else 0

    def turn(self) -> bool:
        """One pass over the jobs; True when a drain is done."""
        try:
            timed(self.lifecycle.check_model)
            if not self.lifecycle.targets() and self.lifecycle.backfill is None:
                if self.drain:
                    log.info("no promoted CNN version and no collection: nothing to do")
                    return True
                mv.sleep_unless(self.halted, 1.0)
                return False
            timed(self.stream_step)
            for part in (self.lifecycle.backfill_step, self.retry_step,
                         self.reconciler.step, self.lifecycle.drop_retired,
                         self.lifecycle.reload_after_outage, self.warmup.step):
                # What came during a long part goes out now, not after the other parts
                # too. Not after every part: each stream batch costs its own queries, and
                # many small ones slow the turn (a backfill then falls behind new projects).
                if timed(part) > STREAM_AGAIN_AFTER_S:
                    timed(self.stream_between)
            if self.drain and self.drained():
                log.info("backfills done and caught up on every partition; draining done")
                self.report_waiting()
                return True
        except psycopg.Error as error:
            self.db.failed(error)  # retried on the next turn: every write is idempotent
        return False

    def caught_up(self) -> bool:
        return self.stream is not None and self.stream.caught_up()

    def drained(self) -> bool:
        if self.lifecycle.failed:
            return True
        return (self.lifecycle.backfill is None and self.caught_up()
                and not self.retries_pending())

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
        self.db.close()


def timed(part: Callable[[], object], slow_s: float = 5.0) -> float:
    """Run `part`; the seconds it took. A slow part delays every stream event behind it:
    say which one it was."""
    started = time.monotonic()
    part()
    took = time.monotonic() - started
    name = getattr(part, "__qualname__", str(part))
    metrics.LOOP_PART.labels(name).observe(took)
    if took > slow_s:
        log.warning("slow loop step: %s took %.1f s", name, took)
    return took
