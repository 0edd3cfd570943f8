"""The embedder's Postgres connection: every call retried until the database takes it.

Each action is one transaction, so a retry after a lost connection repeats it whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import psycopg

from services.embedder import collections as mv
from services.embedder import metrics
from shared import retry
from shared.db.connect import Reconnecting
from shared.settings import Settings

T = TypeVar("T")


class Database:
    """`wait(seconds)` is how a retry waits (True: stop); the embedder passes one that polls
    its stream with the partitions paused, so an outage does not cost the group."""

    def __init__(self, settings: Settings, wait: Callable[[float], bool]):
        self.settings, self.wait = settings, wait
        self.outage = retry.Outage("database", settings.embed_retry_max_s, base_s=0.1,
                                   log=logging.getLogger("cofeat.embed"))
        self.connection = Reconnecting(settings, autocommit=True)

    def __call__(self) -> psycopg.Connection:
        return self.connection.get()

    def run(self, action: Callable[[psycopg.Connection], T]) -> T:
        while True:
            try:
                result = action(self())
                self.outage.recovered()
                return result
            except psycopg.Error as error:
                self.failed(error)

    def failed(self, error: psycopg.Error) -> None:
        """Drop the connection and wait; raises Stopped if asked to stop meanwhile."""
        metrics.DB_ERRORS.inc()
        self.close()
        if self.wait(self.outage.failed(error)):
            raise mv.Stopped

    def close(self) -> None:
        self.connection.close()
