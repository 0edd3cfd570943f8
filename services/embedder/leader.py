"""Active/standby replicas: only the holder of a Postgres advisory lock embeds.

Two embedders on one consumer group and Milvus prefix would both backfill the same
collection and race on alias swaps and drops. So each replica first waits for the lock; the
leader runs an Embedder until it stops or loses the lock (its session ended: database
restart, network cut), then waits again and, once leading, starts over from discover().
Nothing is lost in between: offsets are stored in Postgres only after Milvus acknowledged,
and every write is an idempotent upsert or delete.
"""

from __future__ import annotations

import logging
import signal

import psycopg

from services.embedder import collections as mv
from services.embedder import metrics
from services.embedder.service import Embedder
from shared import retry
from shared.db.locks import SessionLock, lock_key
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")


def leader_lock(settings: Settings) -> SessionLock:
    # Per group and prefix: deployments (or test namespaces) sharing a database but not
    # Milvus collections or offsets must not wait for each other.
    return SessionLock(settings, lock_key(
        f"cofeat-embed:{settings.embed_group}:{settings.milvus_prefix}"))


class Replica:
    def __init__(self, settings: Settings, drain: bool = False):
        self.settings, self.drain = settings, drain
        self.lock = leader_lock(settings)
        self.outage = retry.Outage("database", settings.embed_retry_max_s, base_s=0.1,
                                   log=log)
        self.stopping = False
        self.embedder: Embedder | None = None

    def stop(self, *_args) -> None:
        self.stopping = True
        if self.embedder is not None:
            self.embedder.stop()

    def run(self) -> int:
        """The Embedder's exit code; 0 when stopped as a standby."""
        try:
            while self.wait_for_lock():
                self.embedder = Embedder(self.settings, drain=self.drain, lock=self.lock)
                if self.stopping:  # a signal between the wait and the assignment
                    self.embedder.stop()
                code = self.embedder.run()
                if not self.embedder.lost:
                    return code
                metrics.LEADER.set(0)
                self.embedder = None
            return 0
        finally:
            self.lock.release()
            metrics.LEADER.set(0)

    def wait_for_lock(self) -> bool:
        """True once this replica leads; False if asked to stop first."""
        metrics.LEADER.set(0)
        announced = False
        while not self.stopping:
            try:
                got = self.lock.try_acquire()
                self.outage.recovered()
            except psycopg.Error as error:
                metrics.DB_ERRORS.inc()
                got, delay = False, self.outage.failed(error)
            else:
                delay = self.settings.embed_standby_poll_s
                if not got and not announced:
                    announced = True
                    self.log_standby()
            if got:
                metrics.LEADER.set(1)
                log.info("leading: took the embedder lock %d", self.lock.key)
                return True
            if mv.sleep_unless(lambda: self.stopping, delay):
                break
        return False

    def log_standby(self) -> None:
        why = ("a drain beside a running leader would fight it over backfills and alias "
               "swaps; " if self.drain else "")
        log.info("standby: another embedder holds the lock %d (group %s, Milvus prefix %r); "
                 "%swaiting, trying every %.1f s", self.lock.key, self.settings.embed_group,
                 self.settings.milvus_prefix, why, self.settings.embed_standby_poll_s)


def install_signal_handlers(replica: Replica) -> None:
    signal.signal(signal.SIGTERM, replica.stop)
    signal.signal(signal.SIGINT, replica.stop)
