"""Advisory locks on a real Postgres: one holder per key, released with the session."""

from __future__ import annotations

import psycopg

from shared.db.locks import SessionLock, advisory_lock, lock_key
from shared.settings import Settings
from tests.helpers import wait_until


def locks(db_url: str, n: int, **kwargs) -> list[SessionLock]:
    settings = Settings(database_url=db_url)
    return [SessionLock(settings, lock_key("test-locks"), **kwargs) for _ in range(n)]


def terminate(db_url: str, lock: SessionLock) -> None:
    pid = lock.conn.info.backend_pid
    with psycopg.connect(db_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        # The backend exits, and its locks go, shortly after the signal.
        wait_until(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                             (pid,)).fetchone(), 10, "the backend gone")


def test_keys_are_stable_signed_int64_and_differ_per_name():
    assert lock_key("cofeat-embed:g:p") == lock_key("cofeat-embed:g:p")
    assert lock_key("a") == 4681665781835383343  # the same in every process and release
    keys = {lock_key(f"cofeat-embed:g:{prefix}") for prefix in ("", "a_", "b_", "t1_")}
    assert len(keys) == 4
    assert all(-(2**63) <= key < 2**63 for key in keys)


def test_one_holder_until_it_releases_or_its_connection_closes(db_url):
    first, second = locks(db_url, 2)
    try:
        assert not first.held()  # nothing taken yet
        assert first.try_acquire() and first.try_acquire()  # again: still held, not stacked
        assert not second.try_acquire() and not second.try_acquire()
        first.release()
        assert not first.held()
        assert second.try_acquire()
        assert not first.try_acquire()
        second.conn.close()  # what a process that dies leaves behind
        # The server ends the session, and drops its locks, shortly after the socket closes.
        wait_until(first.try_acquire, 10, "the lock free")
        assert first.held(force=True)
        assert not second.held()
    finally:
        first.release()
        second.release()


def test_a_terminated_holder_loses_the_lock_and_notices(db_url):
    first, second = locks(db_url, 2, check_every_s=0.0)
    try:
        assert first.try_acquire() and first.held()
        assert not second.try_acquire()
        terminate(db_url, first)  # a database restart or an operator, as far as it can tell
        assert second.try_acquire()
        assert not first.held()
        assert not first.try_acquire()  # reconnects, and finds the lock taken
        terminate(db_url, second)
        assert first.try_acquire()
    finally:
        first.release()
        second.release()


def test_held_asks_the_server_at_most_every_interval(db_url):
    (lock,) = locks(db_url, 1, check_every_s=3600.0)
    try:
        assert lock.try_acquire()
        terminate(db_url, lock)
        assert lock.held()  # answered from the last check: cheap enough for every turn
        assert not lock.held(force=True)
        assert not lock.held()
    finally:
        lock.release()


def test_advisory_lock_context_skips_when_taken(db_url):
    with psycopg.connect(db_url) as a, psycopg.connect(db_url) as b:
        with advisory_lock(a, 42) as got_a:
            assert got_a
            with advisory_lock(b, 42) as got_b:
                assert not got_b
        with advisory_lock(b, 42) as got_b:
            assert got_b
