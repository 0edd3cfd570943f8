"""Engines and the schema check every service runs before it starts."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from shared.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class SchemaBehind(RuntimeError):
    pass


def sqlalchemy_url(url: str) -> str:
    """Any postgresql URL to the psycopg 3 dialect."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def connect_args(settings: Settings) -> dict:
    args: dict = {}
    if settings.database_sslmode:
        args["sslmode"] = settings.database_sslmode
    if settings.database_sslrootcert:
        args["sslrootcert"] = str(settings.database_sslrootcert)
    return args


def make_engine(settings: Settings, url: str | None = None, **kwargs) -> Engine:
    url = url or settings.require_database_url()
    return create_engine(sqlalchemy_url(url), connect_args=connect_args(settings),
                         pool_pre_ping=True, **kwargs)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic's ini interpolation treats % specially.
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("postgresql://x/x")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_current_schema(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaBehind(
            f"database schema is at {current or 'nothing'}, code needs {head}: "
            "run `cofeat migrate`"
        )


def upgrade(engine: Engine, settings: Settings) -> None:
    from alembic import command

    config = alembic_config(str(engine.url.render_as_string(hide_password=False)))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
