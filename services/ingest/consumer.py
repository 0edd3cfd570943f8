"""The ingest loop: poll a batch, store it with its offsets in one transaction, repeat.

Postgres holds each partition's next offset; on every assignment the consumer seeks there,
so a crash anywhere replays at most the unstored batch, and replays are stored once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable

import psycopg
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from services.ingest import dlq, metrics
from services.ingest.batch import Batch, split_records
from shared import topics
from shared.db.connect import connect
from shared.db.store import load_offsets, write_batch
from shared.kafka import positions
from shared.kafka.config import consumer_config, producer_config
from shared.settings import Settings

log = logging.getLogger("cofeat.ingest")

OUTAGE_LOG_INTERVAL_S = 30.0


class Outage:
    """Backoff with one log line per interval instead of one per retry."""

    def __init__(self, what: str, max_delay_s: float):
        self.what, self.max_delay_s = what, max_delay_s
        self.failures, self.last_log = 0, 0.0

    def failed(self, error: Exception) -> float:
        self.failures += 1
        now = time.monotonic()
        if now - self.last_log >= OUTAGE_LOG_INTERVAL_S:
            log.warning("%s unavailable (%s failures so far): %s", self.what, self.failures,
                        type(error).__name__ + ": " + str(error).splitlines()[0][:200])
            self.last_log = now
        return min(self.max_delay_s, 0.2 * 2 ** min(self.failures, 10))

    def recovered(self) -> None:
        if self.failures:
            log.info("%s back after %d failures", self.what, self.failures)
        self.failures, self.last_log = 0, 0.0


class _SeekToStored(ConsumerRebalanceListener):
    def __init__(self, ingestor: Ingestor):
        self.ingestor = ingestor

    def on_partitions_revoked(self, revoked) -> None:
        # Every stored batch already carried its offsets; nothing is pending here.
        pass

    def on_partitions_assigned(self, assigned) -> None:
        self.ingestor.seek_to_stored(list(assigned))


class Ingestor:
    def __init__(self, settings: Settings, drain: bool = False):
        self.settings = settings
        self.drain = drain
        self.group = settings.ingest_group
        self.interactions_topic = topics.interactions(settings.topic_prefix)
        self.projects_topic = topics.projects(settings.topic_prefix)
        self.stopping = False
        self.joined = False
        self.conn: psycopg.Connection | None = None
        self.db_outage = Outage("database", settings.ingest_retry_max_s)
        self.kafka_outage = Outage("kafka", settings.ingest_retry_max_s)
        self.consumer = KafkaConsumer(**consumer_config(settings, self.group))
        self.producer = KafkaProducer(**producer_config(settings))
        self.stored_events = 0
        self.dead_letters = 0

    # -- database ------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = connect(self.settings)
        return self.conn

    def _with_database(self, action: Callable[[psycopg.Connection], object]):
        """Run `action` until the database takes it; None if asked to stop meanwhile."""
        while True:
            try:
                result = action(self._connection())
                self.db_outage.recovered()
                return result
            except psycopg.Error as error:
                # Connection loss and server errors alike: the transaction rolled back
                # whole, so retrying the same batch is safe.
                metrics.STORE_ERRORS.inc()
                self._drop_connection()
                delay = self.db_outage.failed(error)
                if self._sleep(delay):
                    return None

    def _drop_connection(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True if a stop was requested."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, seconds))
        return self.stopping

    # -- partitions ----------------------------------------------------------------------

    def seek_to_stored(self, assigned: list[TopicPartition]) -> None:
        self.joined = True
        wanted = [(tp.topic, tp.partition) for tp in assigned]
        stored = self._with_database(lambda conn: load_offsets(conn, self.group, wanted))
        if stored is None:
            return  # stopping; nothing will be consumed
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        log.info("assigned %s", ", ".join(f"{t.topic}[{t.partition}]" for t in assigned))

    def caught_up(self) -> bool:
        # Joined with no partitions (more members than partitions) counts as caught up.
        return self.joined and positions.caught_up(self.consumer)

    # -- the loop ------------------------------------------------------------------------

    def store(self, batch: Batch) -> bool:
        """Dead letters first (acknowledged), then events and offsets in one transaction."""
        started = time.perf_counter()
        if batch.dead and not self._publish_dead(batch):
            return False
        result = self._with_database(lambda conn: write_batch(
            conn, batch.interactions, batch.project_events, self.group, batch.next_offsets))
        if result is None:
            return False
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(batch))
        self._count(batch, result.interactions_new)
        self._commit_to_kafka(batch)
        return True

    def _publish_dead(self, batch: Batch) -> bool:
        while True:
            try:
                dlq.publish(self.producer, batch.dead)
                self.kafka_outage.recovered()
                return True
            except KafkaError as error:
                if self._sleep(self.kafka_outage.failed(error)):
                    return False

    def _count(self, batch: Batch, new_interactions: int) -> None:
        it, pt = self.interactions_topic, self.projects_topic
        metrics.EVENTS.labels(it, "stored").inc(new_interactions)
        metrics.EVENTS.labels(it, "duplicate").inc(len(batch.interactions) - new_interactions)
        metrics.EVENTS.labels(pt, "received").inc(len(batch.project_events))
        for letter in batch.dead:
            metrics.EVENTS.labels(letter.record.topic, "invalid").inc()
        self.stored_events += len(batch.interactions) + len(batch.project_events)
        self.dead_letters += len(batch.dead)

    def _commit_to_kafka(self, batch: Batch) -> None:
        # Only for lag tools: Postgres is the truth, so a failed commit is harmless.
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                   for (t, p), o in batch.next_offsets.items()}
        try:
            self.consumer.commit_async(offsets)
        except KafkaError as error:
            log.debug("kafka offset commit skipped: %s", error)

    def run(self) -> int:
        self.consumer.subscribe([self.interactions_topic, self.projects_topic],
                                listener=_SeekToStored(self))
        log.info("consuming %s, %s as group %s", self.interactions_topic,
                 self.projects_topic, self.group)
        meter = _Meter()
        try:
            while not self.stopping:
                records = self.consumer.poll(timeout_ms=self.settings.ingest_poll_timeout_ms,
                                             max_records=self.settings.ingest_max_records)
                batch = split_records(records, self.interactions_topic, self.projects_topic)
                if len(batch) and not self.store(batch):
                    break
                meter.tick(len(batch), self)
                positions.rewind_truncated(self.consumer)
                positions.report_lag(self.consumer, metrics.LAG)
                if self.drain and self.caught_up():
                    log.info("caught up on every assigned partition; draining done")
                    break
        finally:
            self.close()
        meter.summary(self)
        return 0

    def stop(self, *_args) -> None:
        self.stopping = True

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.producer.close(timeout=10)
            self._drop_connection()


class _Meter:
    """Events/s and totals in the log every few seconds."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.started = self.last = time.monotonic()
        self.count = 0

    def tick(self, events: int, ingestor: Ingestor) -> None:
        self.count += events
        now = time.monotonic()
        if now - self.last >= self.every_s:
            log.info("%.0f events/s; stored %d, dead letters %d",
                     self.count / (now - self.last), ingestor.stored_events,
                     ingestor.dead_letters)
            self.last, self.count = now, 0

    def summary(self, ingestor: Ingestor) -> None:
        log.info("stopped: stored %d events, %d dead letters in %.1f s",
                 ingestor.stored_events, ingestor.dead_letters,
                 time.monotonic() - self.started)


def install_signal_handlers(ingestor: Ingestor) -> None:
    signal.signal(signal.SIGTERM, ingestor.stop)
    signal.signal(signal.SIGINT, ingestor.stop)
