"""The projects stream: the embedder's own consumer group, offsets kept in Postgres.

Offsets are stored only after Milvus acknowledged the batch they cover, so a crash or an
outage replays events instead of losing them; replays are harmless (upserts and deletes
by primary key). Invalid events are only counted: ingest already dead-letters them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from services.embedder import metrics
from shared import topics
from shared.events import InvalidEvent, ProjectEvent, parse_project
from shared.kafka import positions
from shared.kafka.config import consumer_config
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")


@dataclass
class Polled:
    events: list[ProjectEvent] = field(default_factory=list)
    invalid: int = 0
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    produced_ms: dict[str, int] = field(default_factory=dict)  # event_id -> Kafka timestamp


class _SeekToStored(ConsumerRebalanceListener):
    def __init__(self, stream: Stream):
        self.stream = stream

    def on_partitions_revoked(self, revoked) -> None:
        pass  # nothing acknowledged is pending: offsets are stored with each batch

    def on_partitions_assigned(self, assigned) -> None:
        self.stream.seek_to_stored(list(assigned))


class Stream:
    def __init__(self, settings: Settings,
                 load_offsets: Callable[[list[tuple[str, int]]], dict | None]):
        self.settings = settings
        self.topic = topics.projects(settings.topic_prefix)
        self.load_offsets = load_offsets
        self.joined = False
        self.consumer = KafkaConsumer(**consumer_config(
            settings, settings.embed_group, max_poll_records=settings.embed_max_records))
        self.consumer.subscribe([self.topic], listener=_SeekToStored(self))

    def seek_to_stored(self, assigned: list[TopicPartition]) -> None:
        stored = self.load_offsets([(tp.topic, tp.partition) for tp in assigned])
        if stored is None:
            return  # stopping
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        self.joined = True
        log.info("assigned %s", ", ".join(f"{t.topic}[{t.partition}]" for t in assigned))

    def poll(self, timeout_ms: int) -> Polled:
        records = self.consumer.poll(timeout_ms=timeout_ms,
                                     max_records=self.settings.embed_max_records)
        polled = Polled()
        for tp, batch in records.items():
            for record in batch:
                try:
                    event = parse(record)
                except InvalidEvent:
                    polled.invalid += 1
                    continue
                polled.events.append(event)
                # The broker-side time the event was produced: freshness is measured from
                # it, not from the event's own ts (which may be simulated or skewed).
                polled.produced_ms[event.event_id] = record.timestamp
            if batch:
                polled.next_offsets[(tp.topic, tp.partition)] = batch[-1].offset + 1
        if polled.invalid:
            metrics.EVENTS.labels("invalid").inc(polled.invalid)
        return polled

    def caught_up(self) -> bool:
        return (self.joined and bool(self.consumer.assignment())
                and positions.caught_up(self.consumer))

    def rewind_truncated(self) -> None:
        positions.rewind_truncated(self.consumer)

    def report_lag(self) -> None:
        positions.report_lag(self.consumer, metrics.LAG)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def parse(record) -> ProjectEvent:
    event = parse_project(record.value)
    if record.key != str(event.project_id).encode():
        raise InvalidEvent("bad_key", "key must be the id as decimal text")
    return event


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
