"""`cofeat dev`: real Postgres, Tansu and Milvus started and stopped in a temporary data dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from services.dev import stack
from services.dev.cli import app
from shared.settings import Settings
from tests.conftest import MILVUS_PORT, free_port

runner = CliRunner()
COFEAT = str(Path(sys.executable).parent / "cofeat")  # the installed entry point

# Explicit None: the developer's or CI's COFEAT_* variables must not leak into these tests.
UNSET = {"database_url": None, "kafka_bootstrap": None, "milvus_uri": None}


@pytest.fixture
def stack_dir():
    """A data dir outside tmp_path (see pg_admin_url in tests/conftest.py for why)."""
    path = Path(tempfile.mkdtemp(prefix="cofeat-dev-test-"))
    yield path
    stack.down(Settings(data_dir=path, **UNSET), say=lambda _: None)  # after a failed test
    shutil.rmtree(path, ignore_errors=True)


def make_settings(data_dir, **overrides) -> Settings:
    values = UNSET | {"data_dir": data_dir, "dev_kafka_port": free_port(),
                      "dev_milvus_port": MILVUS_PORT, "topic_prefix": f"t{uuid.uuid4().hex[:8]}."}
    return Settings(**values | overrides)


def cli_env(settings: Settings) -> dict[str, str]:
    env = {"COFEAT_DATA_DIR": str(settings.data_dir),
           "COFEAT_DEV_KAFKA_PORT": str(settings.dev_kafka_port),
           "COFEAT_DEV_MILVUS_PORT": str(settings.dev_milvus_port),
           "COFEAT_TOPIC_PREFIX": settings.topic_prefix}
    for piece, key in stack.URL_KEY.items():
        value = stack.setting_value(settings, piece)
        if value is not None:
            env["COFEAT_" + key.upper()] = value
    return env


def cli(settings: Settings, *args: str):
    # Unset variables must be removed, not inherited from the developer's shell or CI.
    env = {"COFEAT_" + key.upper(): None for key in UNSET} | cli_env(settings)
    return runner.invoke(app, list(args), env=env)


def states(settings: Settings) -> dict[str, str]:
    return {row.name: row.state for row in stack.status(settings)}


def timed(action, *args):
    began = time.monotonic()
    result = action(*args)
    print(f"{action.__name__}: {time.monotonic() - began:.2f} s")
    return result


# -- units ----------------------------------------------------------------------------------


def test_mask_url_hides_passwords_only():
    assert stack.mask_url("postgresql://u:s3cret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert stack.mask_url("postgresql://db/x?user=u&password=s3cret") == \
        "postgresql://db/x?user=u&password=***"
    plain = "postgresql://postgres:@/postgres?host=/tmp/pg"
    assert stack.mask_url(plain) == plain
    assert stack.mask_url("127.0.0.1:9092") == "127.0.0.1:9092"


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    log = tmp_path / "x.log"
    proc = stack.spawn(["sh", "-c", "echo cannot bind >&2; exit 3"], log, tmp_path)
    with pytest.raises(stack.StackError, match="(?s)exited with code 3.*cannot bind"):
        stack.wait_ready(lambda: False, "X", log, 10, proc)


def test_bad_setting_is_one_line_and_exit_2(tmp_path):
    result = runner.invoke(app, ["status"], env={"COFEAT_DEV_KAFKA_PORT": "nope"})
    assert result.exit_code == 2
    assert "COFEAT_DEV_KAFKA_PORT" in result.output
    assert "nope" not in result.output


def test_status_masks_an_external_password(stack_dir):
    settings = make_settings(stack_dir, database_url="postgresql://u:s3cret@127.0.0.1:1/x")
    result = cli(settings, "status")
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    assert "postgresql://u:***@127.0.0.1:1/x" in result.output


# -- real servers ---------------------------------------------------------------------------


def test_the_running_milvus_is_found_whoever_started_it(milvus_uri):
    """What `milvus_stopped` (a restart) and `stop_milvus` after one go by."""
    record = stack.running_milvus(port=MILVUS_PORT)
    if record is None:
        pytest.skip(f"{milvus_uri} is not a milvus-server process of this machine")
    assert record["url"] == milvus_uri
    assert Path(record["dir"], "bin").is_dir()  # the data dir the binaries run from
    assert stack.owned_process(record) is not None
    assert stack.running_milvus(milvus_dir=record["dir"])["pid"] == record["pid"]
    assert stack.running_milvus(port=free_port()) is None


def test_milvus_is_started_or_reused(stack_dir, pg_admin_url, broker):
    """Starts Milvus when none runs on this machine, else takes the reuse path."""
    settings = make_settings(stack_dir, database_url=pg_admin_url, kafka_bootstrap=broker)
    timed(stack.up, settings)
    record = stack.read_state(settings)["pieces"]["milvus"]
    assert stack.milvus_answers(record["url"])
    started = record["mode"] == "started"
    assert states(settings)["milvus"] == ("running" if started else "reused")
    timed(stack.down, settings)
    assert not settings.stack_file.exists()
    if started:
        assert not stack.port_open(MILVUS_PORT)
        assert stack.owned_process(record) is None
    else:
        assert stack.milvus_answers(record["url"])  # not ours: left running


def test_up_status_env_up_down_status(stack_dir, milvus_uri):
    settings = make_settings(stack_dir)
    timed(stack.up, settings)
    assert states(settings) == {"postgres": "running", "kafka": "running", "milvus": "reused"}
    state = json.loads(settings.stack_file.read_text())
    pids = {p: r["pid"] for p, r in state["pieces"].items()}

    # Services find the servers through stack.json when the variables are unset.
    assert stack.postgres_answers(settings.require_database_url())
    assert settings.require_kafka_bootstrap() == f"127.0.0.1:{settings.dev_kafka_port}"
    assert settings.require_milvus_uri() == milvus_uri
    topics = stack.kafka_settings(settings, state)
    from kafka import KafkaAdminClient

    from shared.kafka.config import client_config

    admin = KafkaAdminClient(**client_config(topics))
    assert f"{settings.topic_prefix}cofeat.interactions" in admin.list_topics()
    admin.close()

    result = cli(settings, "status")
    assert result.exit_code == 0, result.output
    assert "running" in result.output and "reused" in result.output

    result = cli(settings, "env")
    assert result.exit_code == 0, result.output
    exported = dict(line.removeprefix("export ").split("=", 1)
                    for line in result.output.splitlines())
    assert exported["COFEAT_KAFKA_BOOTSTRAP"] == settings.require_kafka_bootstrap()
    assert exported["COFEAT_MILVUS_URI"] == milvus_uri
    shell = subprocess.run(["bash", "-c", result.output + 'echo "$COFEAT_DATABASE_URL"'],
                           capture_output=True, text=True, check=True)
    assert shell.stdout.strip() == settings.require_database_url()

    # Twice is fine (through the real entry point), also with the variables `env` printed
    # set: nothing new starts.
    began = time.monotonic()
    again = subprocess.run([COFEAT, "dev", "up"], env=cli_env(
        settings) | {"PATH": os.environ["PATH"]}, capture_output=True, text=True, check=True)
    print(f"second up (CLI process): {time.monotonic() - began:.2f} s")
    said = again.stdout.splitlines()
    assert sum("already running" in line for line in said) == 3, again.stdout
    assert "milvus: already running (reused" in again.stdout
    assert not again.stderr.strip(), again.stderr
    with_env = settings.model_copy(update={
        "database_url": SecretStr(settings.require_database_url()),
        "kafka_bootstrap": settings.require_kafka_bootstrap(), "milvus_uri": milvus_uri})
    stack.up(with_env, said.append)
    assert states(with_env)["kafka"] == "running"
    state = json.loads(settings.stack_file.read_text())
    assert {p: r["pid"] for p, r in state["pieces"].items()} == pids

    result = cli(settings, "down")
    assert result.exit_code == 0, result.output
    assert "left running" in result.output  # the reused Milvus
    assert not settings.stack_file.exists()
    for piece in ("postgres", "kafka"):
        assert stack.owned_process(state["pieces"][piece]) is None
    assert not stack.port_open(settings.dev_kafka_port)
    assert stack.milvus_answers(milvus_uri)

    result = cli(settings, "status")
    assert result.exit_code == 0, result.output
    assert states(settings) == {"postgres": "stopped", "kafka": "stopped", "milvus": "stopped"}
    assert cli(settings, "env").exit_code == 1


def test_stale_records_are_reported_cleaned_and_replaced(stack_dir, pg_admin_url, milvus_uri):
    settings = make_settings(stack_dir, database_url=None, milvus_uri=milvus_uri)
    dead = subprocess.Popen(["true"])
    dead.wait()
    state = {"pieces": {}}
    # A pid the kernel gave to another program (this test): must never be signalled.
    stack.set_record(state, "postgres", {"mode": "started", "pid": os.getpid(),
                                         "markers": [str(stack_dir / "pg")], "url": pg_admin_url,
                                         "log": "x", "dir": str(stack_dir / "pg")})
    stack.set_record(state, "kafka", {"mode": "started", "pid": dead.pid,
                                      "markers": ["tansu"], "url": "127.0.0.1:1", "log": "x"})
    stack.write_state(settings, state)

    assert states(settings) == {"postgres": "stale", "kafka": "stale", "milvus": "external"}
    result = cli(settings, "status")
    assert result.exit_code == 1
    assert "stale" in result.output

    said = []
    stack.down(settings, said.append)
    assert psutil.Process(os.getpid()).is_running()
    assert "kafka: was not running (stale record removed)" in said
    assert not settings.stack_file.exists()

    # `up` over a stale record starts a fresh server.
    stack.write_state(settings, state)
    stack.up(settings)
    fresh = stack.read_state(settings)["pieces"]
    assert fresh["kafka"]["pid"] != dead.pid and fresh["postgres"]["pid"] != os.getpid()
    assert states(settings) == {"postgres": "running", "kafka": "running", "milvus": "external"}
    stack.down(settings)
    assert stack.owned_process(fresh["kafka"]) is None


def test_external_settings_skip_pieces(stack_dir, pg_admin_url, broker, milvus_uri):
    settings = make_settings(stack_dir, database_url=pg_admin_url, kafka_bootstrap=broker,
                             milvus_uri=milvus_uri)
    said = []
    stack.up(settings, said.append)
    assert all("external" in line for line in said if "topics" not in line), said
    state = stack.read_state(settings)
    assert state["pieces"] == {} and "database_url" not in state
    # Topics are created on the external broker.
    from kafka import KafkaAdminClient

    from shared.kafka.config import client_config

    admin = KafkaAdminClient(**client_config(settings))
    assert f"{settings.topic_prefix}cofeat.projects.dlq" in admin.list_topics()
    admin.close()
    assert set(states(settings).values()) == {"external"}
    assert cli(settings, "env").exit_code == 1
    stack.down(settings)


def test_an_unreachable_external_server_fails_up(stack_dir, monkeypatch):
    monkeypatch.setattr(stack, "EXTERNAL_TIMEOUT", 0.5)
    settings = make_settings(stack_dir, database_url=f"postgresql://u:s3cret@127.0.0.1:"
                                                    f"{free_port()}/x")
    with pytest.raises(stack.StackError) as caught:
        stack.up(settings)
    assert "COFEAT_DATABASE_URL" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert stack.read_state(settings)["pieces"] == {}
