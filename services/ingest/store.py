"""One batch into Postgres: its events and offsets in one transaction, its dead letters
acknowledged by the broker before that transaction commits.

A batch that Postgres refuses for its data (a constraint, a value out of range) is split
until the records responsible are found (shared/retry.py `bisect`, each try in a savepoint
of one transaction): the others are stored, those are dead-lettered as `store_rejected`
with the error, before that transaction commits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg

from shared import retry
from shared.db.connect import Reconnecting
from shared.db.store import BatchResult, write_batch
from shared.kafka.batch import Batch
from shared.kafka.dlq import DeadLetters
from shared.kafka.runtime import bounded
from shared.settings import Settings

log = logging.getLogger("cofeat.ingest")
# The longest one write may take before it counts as failed (a server or network gone
# silent); a batch of thousands of rows takes well under a second.
STORE_TIMEOUT_S = 60.0


@dataclass
class Stored:
    result: BatchResult
    seconds: float


class Store:
    def __init__(self, settings: Settings, interactions_topic: str, projects_topic: str,
                 dead_letters: DeadLetters):
        self.settings = settings
        self.group = settings.ingest_group
        self.topics = (interactions_topic, projects_topic)
        self.dead_letters = dead_letters
        options = bounded(STORE_TIMEOUT_S)
        options["options"] += f" -c synchronous_commit={settings.ingest_synchronous_commit}"
        self.db = Reconnecting(settings, **options)

    def __call__(self, batch: Batch) -> Stored:
        started = time.perf_counter()
        conn = self.db.get()
        try:
            self._dead_letters(batch)
            try:
                result = write_batch(conn, batch.of(self.topics[0]), batch.of(self.topics[1]),
                                     self.group, batch.offsets)
            except Exception as error:
                if retry.is_transient(error) or not retry.blames_input(error):
                    raise
                result = self._isolate(conn, batch, error)
        except psycopg.Error:
            if conn.broken or conn.closed:
                self.close()
            raise
        return Stored(result, time.perf_counter() - started)

    def _dead_letters(self, batch: Batch) -> None:
        """Publish the letters not published yet: a batch stored again after a transient
        failure does not write them twice."""
        if len(batch.rejected) > batch.dead_lettered:
            self.dead_letters.publish(batch.rejected[batch.dead_lettered:])
            batch.dead_lettered = len(batch.rejected)

    def _isolate(self, conn: psycopg.Connection, batch: Batch,
                 error: BaseException) -> BatchResult:
        """One transaction: each try of the bisection in a savepoint, the records Postgres
        refused dead-lettered, then the offsets."""
        interactions, projects = (batch.of(topic) for topic in self.topics)
        log.warning("Postgres refused a batch of %d events (%s): finding the records "
                    "responsible", len(interactions) + len(projects), retry.describe(error))
        total = BatchResult()
        items = ([(0, i) for i in range(len(interactions))]
                 + [(1, i) for i in range(len(projects))])

        def attempt(part: list[tuple[int, int]]) -> None:
            # Nested in the transaction below, write_batch's own is a savepoint.
            result = write_batch(conn, [interactions[i] for t, i in part if t == 0],
                                 [projects[i] for t, i in part if t == 1], self.group, {})
            total.interactions_new += result.interactions_new
            total.project_events_staged += result.project_events_staged

        with conn.transaction():
            failed = retry.bisect(items, attempt)
            for side, topic in enumerate(self.topics):
                batch.set_aside(topic, {i: f"store_rejected: {retry.describe(error)}"
                                        for (t, i), error in failed if t == side})
            self._dead_letters(batch)
            write_batch(conn, [], [], self.group, batch.offsets)
        log.warning("%d records set aside for the dead-letter topic, the rest stored",
                    len(failed))
        return total

    def close(self) -> None:
        self.db.close()
