"""Postgres advisory locks: one run at a time (refresh), one leader among replicas (embed).

Session-level locks end with the session that holds them, so a process that dies, or whose
connection Postgres drops, releases its lock without any cleanup of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator

import psycopg

from shared.db.connect import connect
from shared.settings import Settings

log = logging.getLogger(__name__)

# A partitioned holder keeps its lock until Postgres notices the session is gone. These
# bound that on both sides of the lock connection (only over TCP; a Unix socket needs none):
# the server probes an idle client after 10 s, every 5 s, and drops it after 3 misses (~25 s);
# the client gives up on an unanswered request after 15 s, so a partitioned leader steps
# down before the server hands its lock to a standby. Values in seconds, tcp_user_timeout
# in milliseconds, as libpq and Postgres take them.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
USER_TIMEOUT_MS = 15_000
CONNECT_TIMEOUT_S = 10


@contextlib.contextmanager
def advisory_lock(conn: psycopg.Connection, key: int) -> Iterator[bool]:
    """True while this session holds the lock; False if another run holds it. A session
    lock, so it dies with the connection if the process does."""
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
    conn.commit()
    try:
        yield got
    finally:
        if got and not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            conn.commit()


def lock_key(name: str) -> int:
    """A signed int64 (Postgres's bigint) from a name, the same in every process and
    release: Python's hash() of a str is salted per process."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SessionLock:
    """An advisory lock held by a connection of its own for as long as a process leads.

    The connection does nothing else: a statement of the work failing must not end the
    session, and with it the lock, and the work's transactions must not be entangled with it.
    """

    def __init__(self, settings: Settings, key: int, check_every_s: float = 1.0):
        self.settings, self.key, self.check_every_s = settings, key, check_every_s
        self.conn: psycopg.Connection | None = None
        self.holding = False
        self.checked = 0.0

    def try_acquire(self) -> bool:
        """True if this session holds the lock now. Raises psycopg.Error if the database
        cannot be reached; the caller retries."""
        if self.holding and self.held(force=True):
            return True
        try:
            conn = self._connection()
            got = bool(conn.execute("SELECT pg_try_advisory_lock(%s)",
                                    (self.key,)).fetchone()[0])
        except psycopg.Error:
            self.close()
            raise
        self.holding, self.checked = got, time.monotonic()
        return got

    def held(self, force: bool = False) -> bool:
        """False once the lock connection broke: Postgres released the lock with the
        session. Asks the server at most every `check_every_s` unless `force`d, so a loop
        may call it every turn."""
        if not self.holding or self.conn is None or self.conn.closed or self.conn.broken:
            return self._lost() if self.holding else False
        if not force and time.monotonic() - self.checked < self.check_every_s:
            return True
        try:
            self.conn.execute("SELECT 1")
        except psycopg.Error as error:
            log.warning("advisory lock %d: its connection failed (%s: %s)", self.key,
                        type(error).__name__, (str(error).splitlines() or [""])[0][:200])
            return self._lost()
        self.checked = time.monotonic()
        return True

    def release(self) -> None:
        """Unlock and close; closing alone would release it too, this only says so sooner."""
        if self.holding and self.conn is not None and not self.conn.closed:
            with contextlib.suppress(psycopg.Error):
                self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        self.close()

    def close(self) -> None:
        self.holding = False
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None

    def _lost(self) -> bool:
        self.close()
        return False

    def _connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = connect(self.settings, autocommit=True, keepalives=1,
                                keepalives_idle=KEEPALIVE_IDLE_S,
                                keepalives_interval=KEEPALIVE_INTERVAL_S,
                                keepalives_count=KEEPALIVE_COUNT,
                                tcp_user_timeout=USER_TIMEOUT_MS,
                                connect_timeout=CONNECT_TIMEOUT_S)
            # The server's side of the same probes (per session, so no server setting);
            # ignored on a Unix socket.
            self.conn.execute(
                f"SET tcp_keepalives_idle = {KEEPALIVE_IDLE_S}; "
                f"SET tcp_keepalives_interval = {KEEPALIVE_INTERVAL_S}; "
                f"SET tcp_keepalives_count = {KEEPALIVE_COUNT}; "
                f"SET tcp_user_timeout = {USER_TIMEOUT_MS}")
        return self.conn
