"""Two `cofeat embed` replicas: one leads, the other waits; a killed leader is replaced, and a
leader whose lock session ends steps down and starts over."""

from __future__ import annotations

import logging
import signal
import threading
import time

import psycopg

from services.embedder.leader import Replica
from shared import milvus as contract
from shared.kafka.admin import ensure_topics
from shared.settings import Settings
from tests.conftest import free_port
from tests.helpers import Producer, wait_until
from tests.services.embedder.conftest import (
    alias_target,
    client,
    make_cnn,
    make_image,
    seed_projects,
    start_embed,
    start_ingest,
)
from tests.services.embedder.test_stream import event, metric, visible

POLL = {"COFEAT_EMBED_STANDBY_POLL_S": "0.3"}


def lock_backend(db_url: str) -> int | None:
    """The session holding the test database's only advisory lock: the leader's."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                           "AND database = (SELECT oid FROM pg_database WHERE datname = "
                           "current_database())").fetchone()
    return row[0] if row else None


def test_standby_takes_over_from_a_killed_leader(esettings, db_url, tmp_path):
    ensure_topics(esettings)
    seed_projects(esettings, db_url, 3)
    make_cnn(esettings, db_url, seed=1)
    port_a, port_b = free_port(), free_port()
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    c, producer = client(esettings), Producer(esettings)
    alias = contract.alias(esettings, contract.PROJECTS)
    images = esettings.data_dir / "images"

    def publish(pid: int) -> None:
        producer.projects_([event("published", pid, make_image(images / f"{pid}.png", pid))])
        producer.flush()

    a = start_embed(esettings, log_a, COFEAT_METRICS_PORT=str(port_a), **POLL)
    ingest = start_ingest(esettings, tmp_path / "ingest.log")
    b = standby = None
    try:
        wait_until(lambda: alias_target(c, esettings, contract.PROJECTS) is not None, 90,
                   "A's backfill")
        b = start_embed(esettings, log_b, COFEAT_METRICS_PORT=str(port_b), **POLL)
        publish(100)
        wait_until(lambda: visible(c, alias, [100]) == {100}, 15, "A streaming")
        wait_until(lambda: "standby: another embedder holds the lock" in log_b.read_text(),
                   60, "B waiting as a standby")
        assert metric(port_a, "cofeat_embed_leader") == 1
        assert metric(port_b, "cofeat_embed_leader") == 0
        text = log_b.read_text()
        assert "leading" not in text and "serving" not in text  # no Kafka, no Milvus yet

        a.kill()  # SIGKILL: its session ends with its socket, and the lock with it
        a.wait(10)
        killed = time.monotonic()
        publish(101)
        wait_until(lambda: visible(c, alias, [101]) == {101}, 45, "B streaming after the kill")
        print(f"killed leader -> next project searchable: {time.monotonic() - killed:.1f} s")
        assert metric(port_b, "cofeat_embed_leader") == 1

        # The lock's session ends under a running leader (database restart, network cut):
        # it stops writing, waits again, and, alone, leads again from scratch.
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (lock_backend(db_url),))
        wait_until(lambda: log_b.read_text().count("leading: took the embedder lock") == 2,
                   20, "B leading again")
        publish(102)
        wait_until(lambda: visible(c, alias, [102]) == {102}, 30, "B streaming again")

        # A standby stops on SIGTERM while it waits.
        standby = start_embed(esettings, tmp_path / "c.log", **POLL)
        wait_until(lambda: "standby: another" in (tmp_path / "c.log").read_text(), 60,
                   "C waiting as a standby")
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(10) == 0
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 0
    finally:
        producer.close()
        c.close()
        for proc in (a, b, standby, ingest):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log_b.read_text()
    assert "lost the embedder lock" in text
    assert text.count("serving ") == 2  # discover() again after stepping down


def test_standby_rides_out_an_unreachable_database_and_stops(tmp_path, caplog):
    """Nothing listens on the database port: the standby retries with the outage backoff,
    logs it, and still stops at once when asked."""
    replica = Replica(Settings(
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        data_dir=tmp_path, embed_retry_max_s=0.5))
    timer = threading.Timer(1.5, replica.stop)
    timer.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cofeat.embed"):
        assert replica.run() == 0
    timer.join()
    assert time.monotonic() - started < 5.0  # stopped while waiting, not after a backoff
    assert replica.embedder is None and not replica.lock.held()
    assert "database unavailable" in caplog.text
