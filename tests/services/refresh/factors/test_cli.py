import psycopg
from typer.testing import CliRunner

from services.refresh.cli import app, parse_interval
from shared.db.engine import make_engine
from shared.factors import current_factor_version, factor_version, load_factors
from shared.settings import Settings


def test_intervals():
    assert [parse_interval(text) for text in ("90", "90s", "10m", "1.5h", "1d")] == [
        90, 90, 600, 5400, 86400]


def test_once_writes_a_loadable_version(db_url, data_dir, stored_world, monkeypatch):
    for name, value in {"DATABASE_URL": db_url, "DATA_DIR": str(data_dir), "ALS_FACTORS": "8",
                        "ALS_ITERATIONS": "3", "FILTER_MIN_USER_COUNT": "2",
                        "FILTER_MIN_ITEM_COUNT": "2", "LOG_FORMAT": "text"}.items():
        monkeypatch.setenv(f"COFEAT_{name}", value)
    result = CliRunner().invoke(app, ["factors", "--once"])
    assert result.exit_code == 0, result.output
    assert "factors: promoted version=" in result.output
    with psycopg.connect(db_url) as conn:
        row = current_factor_version(conn)
    engine = make_engine(Settings(database_url=db_url))
    assert current_factor_version(engine) == row  # SQLAlchemy engines work too
    with engine.connect() as connection:
        assert factor_version(connection, row["id"]) == row
    engine.dispose()
    factors = load_factors(data_dir, row)
    assert factors.item_factors.shape == (len(factors.item_ids), 8)
    assert factors.item_factors.dtype == "float32" and factors.item_ids.dtype == "int64"
    assert (row["artifact"], factors.meta["mode"]) == (f"models/factors/v{row['id']}", "full")
    rows = factors.item_rows([factors.item_ids[3], -5])
    assert rows.tolist() == [3, -1]


def test_bad_settings_and_arguments_exit(monkeypatch):
    monkeypatch.setenv("COFEAT_ALS_FACTORS", "zero")
    assert CliRunner().invoke(app, ["factors", "--once"]).exit_code == 2
    assert CliRunner().invoke(app, ["factors"]).exit_code == 2


def test_loop_survives_a_failed_run(monkeypatch, tmp_path):
    import pytest

    from services.refresh import cli
    from services.refresh.heartbeat import heartbeat_path
    from shared.metrics import health

    calls, sleeps = [], []

    def step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database down")

    def sleep(seconds):
        sleeps.append(seconds)
        assert health.ok == (len(calls) == 2)
        # The heartbeat is written by the run that succeeded, not by the failed one.
        assert heartbeat_path(tmp_path).exists() == (len(calls) == 2)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        cli.repeat(60, step, tmp_path)
    assert len(calls) == 2 and all(55 < s <= 60 for s in sleeps)


def test_refuses_an_outdated_schema(pg_admin_url, data_dir, monkeypatch):
    import uuid

    from sqlalchemy.engine import make_url

    plain = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"cofeat_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(plain).set(database=name).render_as_string(hide_password=False)
        monkeypatch.setenv("COFEAT_DATABASE_URL", url)
        monkeypatch.setenv("COFEAT_DATA_DIR", str(data_dir))
        result = CliRunner().invoke(app, ["factors", "--once"])
        assert result.exit_code == 3 and "cofeat migrate" in result.output
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
