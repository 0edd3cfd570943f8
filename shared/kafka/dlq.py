"""Dead letters: the original record, where it came from and why, in `<topic>.dlq`.

A dead letter is always written. One that would not fit the broker's message size
(COFEAT_DLQ_MAX_BYTES; Kafka refuses ~1 MB by default, kafka-python refuses larger sends
itself) loses the original headers first, then the end of its key and value; what was cut
is named in `cofeat.error.truncated`, and the coordinates and the reason always stay.
Records Kafka cannot carry as they are (null key and value, null header values) are
written with empty bytes in their place.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError
from kafka.record.default_records import DefaultRecordBatchBuilder

from shared import retry
from shared.kafka.batch import Rejected
from shared.kafka.config import producer_config
from shared.settings import Settings
from shared.topics import dlq_topic

log = logging.getLogger(__name__)

REASON = "cofeat.error.reason"
TRUNCATED = "cofeat.error.truncated"
SOURCE_TOPIC = "cofeat.source.topic"
SOURCE_PARTITION = "cofeat.source.partition"
SOURCE_OFFSET = "cofeat.source.offset"
MAX_REASON = 1000  # characters: a reason is one line, not a payload
KEY_KEPT = 1024  # bytes of an oversized key kept before the value is cut

Headers = list[tuple[str, bytes]]


def cofeat_headers(letter: Rejected) -> Headers:
    return [(REASON, letter.reason[:MAX_REASON].encode("utf-8", "replace")),
            (SOURCE_TOPIC, letter.topic.encode()),
            (SOURCE_PARTITION, str(letter.partition).encode()),
            (SOURCE_OFFSET, str(letter.offset).encode())]


def original_headers(letter: Rejected) -> Headers:
    # Our own names are ours to set: a producer cannot forge a reason or a source.
    return [(k, b"" if v is None else v) for k, v in letter.headers
            if not k.startswith("cofeat.")]


def size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """kafka-python's own upper bound for one record, as its size check computes it."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


def fit(letter: Rejected, limit: int) -> tuple[bytes | None, bytes | None, Headers]:
    """(key, value, headers) of the dead letter, at most `limit` bytes."""
    key, value = letter.key, letter.value
    if key is None and value is None:
        value = b""  # Kafka takes a record with neither, kafka-python does not
    ours, theirs = cofeat_headers(letter), original_headers(letter)
    if size(key, value, theirs + ours) <= limit:
        return key, value, theirs + ours
    cut = [f"headers={len(theirs)}"] if theirs else []
    # The value goes first; the key only when it alone does not fit.
    room = limit - size(None, None, ours + [(TRUNCATED, b"x" * 80)])  # the note's longest
    if key is not None and len(key) > room:
        cut.append(f"key={len(key)}")
        key = key[:KEY_KEPT]
    if value is not None:
        excess = size(key, value, ours + [(TRUNCATED, b"x" * 80)]) - limit
        if excess > 0:
            cut.append(f"value={len(value)}")
            value = value[:max(0, len(value) - excess)]
    return key, value, ours + [(TRUNCATED, " ".join(cut).encode())]


def minimal(letter: Rejected) -> tuple[None, bytes, Headers]:
    """Coordinates and reason only: what is written when even a fitted letter is refused."""
    sizes = [f"value={len(letter.value or b'')}", f"key={len(letter.key or b'')}",
             f"headers={len(letter.headers)}"]
    return None, b"", cofeat_headers(letter) + [(TRUNCATED, " ".join(sizes).encode())]


class Unavailable(retry.Transient):
    """The dead-letter topic cannot take letters now (broker down, producer renewed)."""


class DeadLetters:
    """Publishes rejected records and waits for the broker's acknowledgement: a dead letter
    must be durable before the offsets move past its record."""

    def __init__(self, settings: Settings, timeout_s: float = 30.0):
        self.settings = settings
        self.limit = settings.dlq_max_bytes
        self.timeout_s = timeout_s
        self.producer = self._producer()

    def _producer(self) -> KafkaProducer:
        # max_request_size: kafka-python's own check then agrees with the configured limit.
        # max_block_ms: a missing topic (checked at start-up) fails a send instead of
        # blocking it for a minute.
        return KafkaProducer(**producer_config(
            self.settings, max_request_size=self.limit, max_block_ms=10_000))

    def publish(self, letters: Iterable[Rejected]) -> int:
        """Write every letter and wait for the acks; raises `Unavailable` (transient) if the
        broker does not take them, having renewed the producer when that may help."""
        try:
            return self._publish(list(letters))
        except KafkaError as error:
            if not error.retriable:
                # An idempotent producer whose broker-side state was lost (a broker that
                # restarted empty) fails for good: only a new one recovers.
                self.close()
                self.producer = self._producer()
            raise Unavailable(retry.describe(error)) from error

    def _publish(self, letters: list[Rejected]) -> int:
        futures = [self._send(letter, *fit(letter, self.limit)) for letter in letters]
        self.producer.flush(timeout=self.timeout_s)
        for letter, future in zip(letters, futures, strict=True):
            try:
                future.get(timeout=self.timeout_s)
            except MessageSizeTooLargeError:
                # The broker's limit is below COFEAT_DLQ_MAX_BYTES: keep what matters.
                log.warning("the broker refused a dead letter of %s[%d]@%d as too large: "
                            "COFEAT_DLQ_MAX_BYTES (%d) is above its limit; writing "
                            "coordinates and reason only", letter.topic, letter.partition,
                            letter.offset, self.limit)
                self._send(letter, *minimal(letter)).get(timeout=self.timeout_s)
        return len(letters)

    def _send(self, letter: Rejected, key, value, headers):
        try:
            return self.producer.send(dlq_topic(letter.topic), key=key, value=value,
                                      headers=headers)
        except MessageSizeTooLargeError:  # kafka-python's own check, before sending
            return self._send(letter, *minimal(letter))

    def close(self) -> None:
        self.producer.close(timeout=10)
