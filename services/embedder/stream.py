"""The stream writer: project events tell which projects changed; Postgres says what they
are now; the writer makes every target collection show that.

An event is applied only once ingest has stored it (or passed it: ingest dead-lettered
what it could not store), so the embedder never runs ahead of the store: an `updated`
event that arrives before ingest stored the `published` one waits a moment instead of
being written from a state Postgres does not have yet. What is written is the project's
current row, never the event itself, so order, duplicates and replays cannot resurrect a
deleted project or bring back an old image.

Offsets are stored in Postgres only after Milvus acknowledged, and never past an event
still waiting for ingest, so a crash or an outage replays events instead of losing them;
replays cost one query (rows already at that state version are not embedded again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from kafka import TopicPartition

from services.embedder import failures, metrics, states
from services.embedder.writer import Target, Writer, Written
from shared import events, topics
from shared.kafka.batch import Batch
from shared.kafka.runtime import Consumer, StoredOffsets
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")


@dataclass(frozen=True)
class Change:
    """One event: which project changed, and where it came from."""

    project_id: int
    event_id: str
    topic: str
    partition: int
    offset: int
    produced_ms: int  # the broker-side time: freshness is measured from it


@dataclass
class Polled:
    changes: list[Change] = field(default_factory=list)
    invalid: int = 0
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    batch: Batch | None = None


def change(record, latest_ms: int | None = None) -> Change:
    """The same contract ingest enforces (without the future check: whether ingest stored
    an event is read from the store, not guessed from a second clock)."""
    event = events.project_record(record.key, record.value)
    return Change(event.project_id, event.event_id, record.topic, record.partition,
                  record.offset, record.timestamp)


class Source:
    """The projects topic as this embedder's consumer group reads it, on the consumer
    runtime (shared/kafka/runtime.py): offsets stored with the data in Postgres, bounded
    rebalance callbacks, and `idle` to wait out an outage without leaving the group."""

    def __init__(self, settings: Settings):
        self.topic = topics.projects(settings.topic_prefix)
        self.runtime = Consumer(settings, settings.embed_group, {self.topic: change},
                                StoredOffsets(settings, settings.embed_group),
                                settings.embed_max_records,
                                retry_max_s=settings.embed_retry_max_s, check_future=False,
                                fetch_max_wait_ms=settings.embed_fetch_max_wait_ms)
        self.runtime.subscribe()

    @property
    def joined(self) -> bool:
        return self.runtime.joined

    def poll(self, timeout_ms: int) -> Polled:
        batch = self.runtime.poll(timeout_ms)
        polled = Polled(batch.of(self.topic), len(batch.rejected), batch.offsets, batch)
        if polled.invalid:
            metrics.EVENTS.labels("invalid").inc(polled.invalid)  # ingest dead-letters them
        return polled

    def done(self, polled: Polled) -> None:
        """Written and offsets stored: count each record's outcome."""
        if polled.batch is not None:
            self.runtime.done(polled.batch, outcome_of_rejected="skipped")

    def position(self, topic: str, partition: int) -> int:
        return self.runtime.consumer.position(TopicPartition(topic, partition))

    def idle(self, seconds: float, stopping: Callable[[], bool]) -> bool:
        return self.runtime.idle(seconds, stopping)

    def caught_up(self) -> bool:
        return bool(self.runtime.consumer.assignment()) and self.runtime.caught_up()

    def end_offsets(self) -> dict[tuple[str, int], int] | None:
        """The broker's end offset of each assigned partition, asked now (the high
        watermarks a consumer caches lag behind by a fetch); None with nothing assigned."""
        assigned = list(self.runtime.consumer.assignment())
        if not assigned:
            return None
        ends = self.runtime.consumer.end_offsets(assigned)
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    def upkeep(self) -> None:
        self.runtime.rewind_truncated()
        self.runtime.report_lag(metrics.LAG)

    def close(self) -> None:
        self.runtime.close()


_INGEST_AT = """
SELECT topic, partition, next_offset FROM consumer_offsets
WHERE group_id = %(group)s AND topic = %(topic)s
"""


class IngestGate:
    """Changes the store has not caught up with yet.

    A change is ready once ingest's stored offset for its partition is past it (ingest
    stored it or dead-lettered it), or its event is in project_events (ingest ran under
    another group). After COFEAT_EMBED_INGEST_WAIT_S it is released anyway: whatever
    Postgres holds then is applied, and the periodic reconciliation catches a later
    arrival.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.waiting: dict[Change, float] = {}  # change -> when it arrived

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, changes: list[Change]) -> None:
        now = time.monotonic()
        for item in changes:
            self.waiting.setdefault(item, now)

    def ready(self, conn: psycopg.Connection) -> list[Change]:
        if not self.waiting:
            return []
        ingested = self._ingested(conn)
        stored = self._stored(conn, [c for c in self.waiting if c not in ingested])
        now = time.monotonic()
        expired = now - self.settings.embed_ingest_wait_s
        out = [c for c, since in self.waiting.items()
               if c in ingested or c.event_id in stored or since <= expired]
        for item in out:
            metrics.INGEST_WAIT.observe(now - self.waiting[item])
        released = [c for c in out if c not in ingested and c.event_id not in stored]
        if released:
            metrics.EVENTS.labels("released").inc(len(released))
            log.warning("%d events not stored by ingest after %.0f s (COFEAT_EMBED_INGEST_"
                        "WAIT_S): applying what Postgres holds for them", len(released),
                        self.settings.embed_ingest_wait_s)
        for item in out:
            del self.waiting[item]
        return out

    def _ingested(self, conn: psycopg.Connection) -> set[Change]:
        topic = next(iter(self.waiting)).topic
        with conn.transaction():
            rows = conn.execute(_INGEST_AT, {"group": self.settings.ingest_group,
                                             "topic": topic}).fetchall()
        at = {(t, p): offset for t, p, offset in rows}
        return {c for c in self.waiting if at.get((c.topic, c.partition), -1) > c.offset}

    @staticmethod
    def _stored(conn: psycopg.Connection, changes: list[Change]) -> set[str]:
        if not changes:
            return set()
        with conn.transaction():
            rows = conn.execute("SELECT event_id FROM project_events WHERE event_id = ANY(%s)",
                                ([c.event_id for c in changes],)).fetchall()
        return {row[0] for row in rows}

    def floor(self, topic: str, partition: int) -> int | None:
        """The lowest offset still waiting here: stored offsets must not pass it."""
        offsets = [c.offset for c in self.waiting if (c.topic, c.partition) == (topic, partition)]
        return min(offsets) if offsets else None


class Stream:
    def __init__(self, settings: Settings, db: Callable[[], psycopg.Connection],
                 writer: Writer, targets: Callable[[], list[Target]],
                 live_since_ms: Callable[[], float | None]):
        self.settings, self.db, self.writer = settings, db, writer
        self.targets, self.live_since_ms = targets, live_since_ms
        self.source = Source(settings)
        self.gate = IngestGate(settings)
        self.read_to: dict[tuple[str, int], int] = {}  # next offset per partition polled
        self.stored: dict[tuple[str, int], int] = {}  # what Postgres holds for us
        self.meter = Meter()

    def step(self, timeout_ms: int) -> None:
        self.apply(self.source.poll(timeout_ms))
        self.source.upkeep()
        self.meter.tick()

    def apply(self, polled: Polled) -> None:
        """One poll's changes, and those ingest has stored since: Milvus first, then
        failures and offsets in one transaction."""
        self.read_to.update(polled.next_offsets)
        observe_polled(polled.changes, self.live_since_ms())
        self.gate.add(polled.changes)
        ready = self.gate.ready(self.db())
        offsets = self._offsets()
        if ready or offsets:
            wanted = states.wanted_for(self.db(), {c.project_id for c in ready})
            written = self.writer.apply(wanted, self.targets())
            failures.commit(self.db(), self.settings, written, wanted, offsets)
            self.stored.update(offsets)
            observe(ready, written, self.live_since_ms())
            metrics.IMAGES.labels("stream").inc(written.embedded)
            metrics.ALREADY_WRITTEN.inc(written.unchanged)
            self.meter.images(written.embedded, written.seconds)
        self.source.done(polled)

    def _offsets(self) -> dict[tuple[str, int], int]:
        """Offsets to store now: as far as polled, but not past a waiting change."""
        out = {}
        for tp, offset in self.read_to.items():
            floor = self.gate.floor(*tp)
            offset = offset if floor is None else min(offset, floor)
            if self.stored.get(tp) != offset:
                out[tp] = offset
        return out

    def caught_up(self) -> bool:
        return self.source.caught_up() and not self.gate

    def end_offsets(self) -> dict[tuple[str, int], int] | None:
        return self.source.end_offsets()

    def applied(self, marks: dict[tuple[str, int], int]) -> bool | None:
        """Is every event below `marks` written to Milvus (its offset stored)? None when a
        partition of `marks` is no longer ours: this replica cannot tell."""
        assigned = {(tp.topic, tp.partition)
                    for tp in self.source.runtime.consumer.assignment()}
        if not marks.keys() <= assigned:
            return None
        return all(self.stored.get(tp, self.source.position(*tp)) >= offset
                   for tp, offset in marks.items())

    def close(self) -> None:
        self.source.close()


def observe(ready: list[Change], written: Written, live_since_ms: float | None) -> None:
    now_ms = time.time() * 1000
    for item in ready:
        if item.project_id in written.failed:
            metrics.EVENTS.labels("failed").inc()
            continue
        metrics.EVENTS.labels("applied").inc()
        if live_since_ms is not None and item.produced_ms > live_since_ms:
            metrics.FRESHNESS.observe(max(0.0, now_ms - item.produced_ms) / 1000)


def observe_polled(changes: list[Change], live_since_ms: float | None) -> None:
    now_ms = time.time() * 1000
    for item in changes:
        if live_since_ms is not None and item.produced_ms > live_since_ms:
            metrics.POLLED_AGE.observe(max(0.0, now_ms - item.produced_ms) / 1000)


class Meter:
    """Stream images/s in the log and as a gauge every few seconds."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.last = time.monotonic()
        self.count, self.seconds = 0, 0.0

    def images(self, count: int, seconds: float) -> None:
        self.count += count
        self.seconds += seconds

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        if self.count:
            rate = self.count / self.seconds if self.seconds else 0.0
            metrics.IMAGES_PER_SECOND.labels("stream").set(rate)
            log.info("stream: %d images in %.0f s, %.0f images/s while embedding",
                     self.count, now - self.last, rate)
        self.last, self.count, self.seconds = now, 0, 0.0
