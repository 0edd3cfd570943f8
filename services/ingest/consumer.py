"""The ingest service: Kafka events into the Postgres store, through the consumer runtime.

Each batch's dead letters, events and next offsets are stored in one Postgres transaction
(services/ingest/store.py), and every assignment seeks to those stored offsets, so a crash
anywhere replays at most the unstored batches, and replays are stored once. Polling,
decoding, pausing under backpressure or an outage, and rebalances are the runtime's
(shared/kafka/runtime.py, shared/kafka/pipeline.py).
"""

from __future__ import annotations

import logging
import signal
import time

from services.ingest import metrics
from services.ingest.store import Store, Stored
from shared import events, retry, topics
from shared.kafka.batch import Batch
from shared.kafka.dlq import DeadLetters
from shared.kafka.pipeline import Pipeline
from shared.kafka.runtime import Consumer, StoredOffsets
from shared.settings import Settings

log = logging.getLogger("cofeat.ingest")


def _interaction(record, latest_ms: int):
    return events.interaction_record(record.key, record.value, latest_ms)


def _project(record, latest_ms: int):
    return events.project_record(record.key, record.value, latest_ms)


class Ingestor:
    def __init__(self, settings: Settings, drain: bool = False):
        self.settings = settings
        self.drain = drain
        self.group = settings.ingest_group
        self.interactions_topic = topics.interactions(settings.topic_prefix)
        self.projects_topic = topics.projects(settings.topic_prefix)
        self.stopping = False
        self.consumer = Consumer(
            settings, self.group, {self.interactions_topic: _interaction,
                                   self.projects_topic: _project},
            StoredOffsets(settings, self.group), settings.ingest_max_records,
            retry_max_s=settings.ingest_retry_max_s)
        self.dead_letters = DeadLetters(settings)
        self.store = Store(settings, self.interactions_topic, self.projects_topic,
                           self.dead_letters)
        self.stored_events = 0
        self.dead_letter_count = 0
        self.meter = _Meter()

    def run(self) -> int:
        """0 when stopped or drained; 1 when the store failed in a way no retry can fix
        (the log says which)."""
        self.consumer.subscribe()
        pipeline = Pipeline(self.consumer, self.store,
                            poll_timeout_ms=self.settings.ingest_poll_timeout_ms,
                            retry_max_s=self.settings.ingest_retry_max_s,
                            on_stored=self._stored, on_failed=self._failed, lag=metrics.LAG)
        code = 0
        try:
            pipeline.run(lambda: self.stopping, drain=self.drain)
        except Exception as error:  # noqa: BLE001 - the process says why and exits 1
            log.error("stopping: storing failed in a way retrying cannot fix: %s",
                      retry.describe(error, 500))
            code = 1
        finally:
            self.close()
        self.meter.summary(self)
        return code

    def _stored(self, batch: Batch, stored: Stored) -> None:
        it, pt = self.interactions_topic, self.projects_topic
        interactions, projects = len(batch.of(it)), len(batch.of(pt))
        new = stored.result.interactions_new
        metrics.EVENTS.labels(it, "stored").inc(new)
        metrics.EVENTS.labels(it, "duplicate").inc(max(0, interactions - new))
        metrics.EVENTS.labels(pt, "received").inc(projects)
        for letter in batch.rejected:
            metrics.EVENTS.labels(letter.topic, "invalid").inc()
        metrics.BATCH_SECONDS.observe(stored.seconds)
        metrics.BATCH_SIZE.observe(len(batch))
        self.stored_events += interactions + projects
        self.dead_letter_count += len(batch.rejected)
        self.meter.tick(len(batch), self)

    def _failed(self, error: BaseException) -> None:
        metrics.STORE_ERRORS.inc()

    def stop(self, *_args) -> None:
        self.stopping = True

    def close(self) -> None:
        try:
            self.consumer.close()
        finally:
            self.dead_letters.close()
            self.store.close()


class _Meter:
    """Events/s and totals in the log every few seconds."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.started = self.last = time.monotonic()
        self.count = 0

    def tick(self, records: int, ingestor: Ingestor) -> None:
        self.count += records
        now = time.monotonic()
        if now - self.last >= self.every_s:
            log.info("%.0f events/s; stored %d, dead letters %d",
                     self.count / (now - self.last), ingestor.stored_events,
                     ingestor.dead_letter_count)
            self.last, self.count = now, 0

    def summary(self, ingestor: Ingestor) -> None:
        log.info("stopped: stored %d events, %d dead letters in %.1f s",
                 ingestor.stored_events, ingestor.dead_letter_count,
                 time.monotonic() - self.started)


def install_signal_handlers(ingestor: Ingestor) -> None:
    signal.signal(signal.SIGTERM, ingestor.stop)
    signal.signal(signal.SIGINT, ingestor.stop)
