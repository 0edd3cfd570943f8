"""Turning one poll's records into a storable batch: valid events, dead letters, offsets."""

from __future__ import annotations

from dataclasses import dataclass, field

from kafka.consumer.fetcher import ConsumerRecord

from shared.events import (
    Interaction,
    InvalidEvent,
    ProjectEvent,
    parse_interaction,
    parse_project,
)


@dataclass
class DeadLetter:
    record: ConsumerRecord
    error: InvalidEvent


@dataclass
class Batch:
    interactions: list[Interaction] = field(default_factory=list)
    project_events: list[ProjectEvent] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.interactions) + len(self.project_events) + len(self.dead)


def _check_key(record: ConsumerRecord, expected: int) -> None:
    if record.key != str(expected).encode():
        raise InvalidEvent("bad_key", "key must be the id as decimal text")


def split_records(records: dict, interactions_topic: str, projects_topic: str) -> Batch:
    """`records` is KafkaConsumer.poll()'s result: {TopicPartition: [ConsumerRecord]}."""
    batch = Batch()
    for tp, partition_records in records.items():
        if not partition_records:
            continue
        parse = _interaction if tp.topic == interactions_topic else _project
        target = batch.interactions if tp.topic == interactions_topic else batch.project_events
        if tp.topic not in (interactions_topic, projects_topic):
            raise ValueError(f"unexpected topic {tp.topic}")
        for record in partition_records:
            try:
                target.append(parse(record))
            except InvalidEvent as error:
                batch.dead.append(DeadLetter(record, error))
        batch.next_offsets[(tp.topic, tp.partition)] = partition_records[-1].offset + 1
    return batch


def _interaction(record: ConsumerRecord) -> Interaction:
    event = parse_interaction(record.value)
    _check_key(record, event.user_id)
    return event


def _project(record: ConsumerRecord) -> ProjectEvent:
    event = parse_project(record.value)
    _check_key(record, event.project_id)
    return event
