"""Log end offsets as fetch responses report them.

ListOffsets may under-report on some Kafka-protocol brokers (Tansu does); the high
watermark that comes back with a fetch does not.
"""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition

from shared.kafka.config import client_config
from shared.settings import Settings


def highwaters(settings: Settings, wanted: list[TopicPartition],
               timeout_s: float = 5.0) -> dict[TopicPartition, int]:
    if not wanted:
        return {}
    # Small fetches: only the watermark is wanted, not the records.
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False,
                             max_partition_fetch_bytes=1024)
    try:
        consumer.assign(wanted)
        consumer.seek_to_beginning(*wanted)
        deadline = time.monotonic() + timeout_s
        found: dict[TopicPartition, int] = {}
        while len(found) < len(wanted) and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200, max_records=1)
            found = {tp: consumer.highwater(tp) for tp in wanted
                     if consumer.highwater(tp) is not None}
            # A poll drains one partition's buffered records at a time: pausing the ones
            # already known moves it on to the others instead of re-reading the first.
            consumer.pause(*found)
        return found
    finally:
        consumer.close()


def topic_partitions(settings: Settings, topic: str) -> list[TopicPartition]:
    consumer = KafkaConsumer(**client_config(settings))
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        return [TopicPartition(topic, p) for p in sorted(partitions)]
    finally:
        consumer.close()


def topic_size(settings: Settings, topic: str) -> int:
    """Messages in a topic (sum of high watermarks; exact while nothing was deleted)."""
    return sum(highwaters(settings, topic_partitions(settings, topic)).values())
