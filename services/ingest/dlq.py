"""Dead letters: the original bytes, where they came from, and why, in headers."""

from __future__ import annotations

from kafka import KafkaProducer

from services.ingest.batch import DeadLetter
from shared.topics import dlq_topic

REASON = "cofeat.error.reason"
SOURCE_TOPIC = "cofeat.source.topic"
SOURCE_PARTITION = "cofeat.source.partition"
SOURCE_OFFSET = "cofeat.source.offset"


def headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    record = letter.record
    original = [(k, v) for k, v in (record.headers or []) if not k.startswith("cofeat.")]
    return original + [
        (REASON, letter.error.reason.encode()),
        (SOURCE_TOPIC, record.topic.encode()),
        (SOURCE_PARTITION, str(record.partition).encode()),
        (SOURCE_OFFSET, str(record.offset).encode()),
    ]


def publish(producer: KafkaProducer, letters: list[DeadLetter], timeout_s: float = 30) -> None:
    """Send and wait for acks: dead letters must be durable before offsets move past them."""
    futures = [producer.send(dlq_topic(letter.record.topic), key=letter.record.key,
                             value=letter.record.value, headers=headers(letter))
               for letter in letters]
    producer.flush(timeout=timeout_s)
    for future in futures:
        future.get(timeout=timeout_s)
