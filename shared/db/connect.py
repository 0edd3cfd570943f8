"""Plain psycopg connections for the fast paths (COPY), with the same URL and TLS settings."""

from __future__ import annotations

import contextlib

import psycopg
from sqlalchemy.engine import make_url

from shared.settings import Settings


def conninfo(url: str) -> str:
    """A libpq URI from any postgresql URL (drops a SQLAlchemy `+driver` suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect(settings: Settings, url: str | None = None, **kwargs) -> psycopg.Connection:
    options: dict = {}
    if settings.database_sslmode:
        options["sslmode"] = settings.database_sslmode
    if settings.database_sslrootcert:
        options["sslrootcert"] = str(settings.database_sslrootcert)
    return psycopg.connect(conninfo(url or settings.require_database_url()), **options, **kwargs)


class Reconnecting:
    """One connection, opened on first use and again after it broke (a lost server, a
    statement timeout that closed it); closing never raises, the connection is gone either
    way."""

    def __init__(self, settings: Settings, **kwargs):
        self.settings, self.kwargs = settings, kwargs
        self.conn: psycopg.Connection | None = None

    def get(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = connect(self.settings, **self.kwargs)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None
