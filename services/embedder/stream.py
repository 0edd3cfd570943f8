"""The projects stream: the embedder's own consumer group on the consumer runtime
(shared/kafka/runtime.py), offsets kept in Postgres.

Offsets are stored only after Milvus acknowledged the batch they cover, so a crash or an
outage replays events instead of losing them; replays are harmless (upserts and deletes
by primary key). Invalid events are counted and skipped: ingest dead-letters them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.embedder import metrics
from shared import events, topics
from shared.events import ProjectEvent
from shared.kafka.batch import Batch
from shared.kafka.runtime import Consumer, StoredOffsets
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")


@dataclass
class Polled:
    events: list[ProjectEvent] = field(default_factory=list)
    invalid: int = 0
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    produced_ms: dict[str, int] = field(default_factory=dict)  # event_id -> Kafka timestamp
    batch: Batch | None = None


def parse(record, latest_ms: int | None = None) -> ProjectEvent:
    """The same contract ingest enforces, future check included, so both skip alike."""
    return events.project_record(record.key, record.value, latest_ms)


class Stream:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.topic = topics.projects(settings.topic_prefix)
        self.runtime = Consumer(settings, settings.embed_group, {self.topic: parse},
                                StoredOffsets(settings, settings.embed_group),
                                settings.embed_max_records,
                                retry_max_s=settings.embed_retry_max_s)
        self.runtime.subscribe()

    @property
    def joined(self) -> bool:
        return self.runtime.joined

    def poll(self, timeout_ms: int) -> Polled:
        batch = self.runtime.poll(timeout_ms)
        polled = Polled(batch=batch, invalid=len(batch.rejected), next_offsets=batch.offsets)
        polled.events = batch.of(self.topic)
        # The broker-side time the event was produced: freshness is measured from it, not
        # from the event's own ts (which may be simulated or skewed).
        polled.produced_ms = {event.event_id: record.timestamp for event, record
                              in zip(polled.events, batch.sources.get(self.topic, []),
                                     strict=True)}
        if polled.invalid:
            metrics.EVENTS.labels("invalid").inc(polled.invalid)
        return polled

    def done(self, polled: Polled) -> None:
        """`polled` is written and its offsets stored: count each record's outcome."""
        if polled.batch is not None:
            self.runtime.done(polled.batch, outcome_of_rejected="skipped")

    def idle(self, seconds: float, stopping: Callable[[], bool]) -> bool:
        return self.runtime.idle(seconds, stopping)

    def caught_up(self) -> bool:
        return bool(self.runtime.consumer.assignment()) and self.runtime.caught_up()

    def rewind_truncated(self) -> None:
        self.runtime.rewind_truncated()

    def report_lag(self) -> None:
        self.runtime.report_lag(metrics.LAG)

    def close(self) -> None:
        self.runtime.close()


def latest_per_project(events: Iterable[ProjectEvent],
                       recent: Recent | None = None) -> list[ProjectEvent]:
    """Each project's newest event, by ts as ingest orders them (ties: the later one).

    Events older than one already applied (per `recent`) are dropped: ingest ignores
    them too, so Milvus and Postgres agree on the latest state.
    """
    latest: dict[int, ProjectEvent] = {}
    for event in events:
        current = latest.get(event.project_id)
        if current is None or event.ts_ms >= current.ts_ms:
            latest[event.project_id] = event
    if recent is not None:
        return [e for e in latest.values() if recent.ts(e.project_id) <= e.ts_ms]
    return list(latest.values())


class Recent:
    """The last event applied per project over a time window: a new backfill re-applies
    them, because Postgres (its source) may not have stored them yet."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.events: OrderedDict[int, tuple[float, ProjectEvent]] = OrderedDict()

    def add(self, events: Iterable[ProjectEvent]) -> None:
        now = time.monotonic()
        for event in events:
            self.events.pop(event.project_id, None)
            self.events[event.project_id] = (now, event)
        while self.events and next(iter(self.events.values()))[0] < now - self.window_s:
            self.events.popitem(last=False)

    def ts(self, project_id: int) -> int:
        entry = self.events.get(project_id)
        return entry[1].ts_ms if entry else -1

    def snapshot(self) -> list[ProjectEvent]:
        return [event for _, event in self.events.values()]
