"""The consumer runtime against the real broker and Postgres: records the client cannot
decode are stepped over one by one, a decoder's surprise becomes a reason, and waiting with
the partitions paused keeps the group membership."""

from __future__ import annotations

import time

from kafka import TopicPartition

from shared import topics
from shared.db.store import write_batch
from shared.kafka.admin import ensure_topics
from shared.kafka.runtime import REBALANCES, Consumer, StoredOffsets
from tests.helpers import RawHeaderKey, produce_raw, wait_until

BAD_KEY = [(RawHeaderKey(b"\xff\xfe"), b"v")]  # a header key that is no UTF-8


def consumer(settings, decode=lambda record, latest: record.value, **overrides) -> Consumer:
    settings = settings.model_copy(update=overrides)
    runtime = Consumer(settings, settings.ingest_group,
                       {topics.interactions(settings.topic_prefix): decode},
                       StoredOffsets(settings, settings.ingest_group), max_records=100)
    runtime.subscribe()
    return runtime


def drain(runtime: Consumer, expected: int, timeout_s: float = 30) -> tuple[list, list]:
    """(events, rejected) polled until `expected` records came, in poll order."""
    events, rejected = [], []
    deadline = time.monotonic() + timeout_s
    while len(events) + len(rejected) < expected and time.monotonic() < deadline:
        batch = runtime.poll(200)
        for part in batch.events.values():
            events += part
        rejected += batch.rejected
    return events, rejected


def test_undecodable_records_are_stepped_over_one_at_a_time(settings, db_url):
    ensure_topics(settings)
    topic = topics.interactions(settings.topic_prefix)
    # In one record batch, between good ones, and alone in batches of their own.
    produce_raw(settings, topic, 0, [(b"k", b"a", []), (b"k", b"bad1", BAD_KEY),
                                     (b"k", b"b", []), (b"k", b"bad2", BAD_KEY)])
    produce_raw(settings, topic, 0, [(b"k", b"bad3", BAD_KEY)])
    produce_raw(settings, topic, 1, [(b"k", b"c", []), (b"k", b"bad4", BAD_KEY)])
    produce_raw(settings, topic, 0, [(b"k", b"d", [])])
    runtime = consumer(settings)
    try:
        events, rejected = drain(runtime, 8)
    finally:
        runtime.close()
    assert sorted(events) == [b"a", b"c", b"d"]
    # Each its own outcome; b"b" (offset 2) follows an undecodable record in its batch, and
    # kafka-python decodes a batch from its start: it cannot be read, it is rejected too.
    assert sorted((r.partition, r.offset) for r in rejected) == [(0, 1), (0, 2), (0, 3),
                                                                 (0, 4), (1, 1)]
    assert all(r.kind == "corrupt_record" and "CorruptRecordError" in r.reason
               and r.value is None for r in rejected)
    behind = [r.offset for r in rejected if "in a record batch" in r.reason]
    assert behind == [2, 3]


def test_a_decoder_that_fails_unexpectedly_rejects_only_that_record(settings, db_url):
    ensure_topics(settings)
    topic = topics.interactions(settings.topic_prefix)
    produce_raw(settings, topic, 0, [(b"k", b"1", []), (b"k", b"0", []), (b"k", b"2", [])])
    runtime = consumer(settings, decode=lambda record, latest: 1 // int(record.value))
    try:
        events, rejected = drain(runtime, 3)
    finally:
        runtime.close()
    assert events == [1, 0]  # 1 // 1, 1 // 2
    assert [(r.offset, r.reason, r.value) for r in rejected] == [
        (1, "internal: ZeroDivisionError", b"0")]


def test_assignment_seeks_to_the_offsets_stored_with_the_data(settings, db_url):
    import psycopg

    ensure_topics(settings)
    topic = topics.interactions(settings.topic_prefix)
    produce_raw(settings, topic, 0, [(b"k", str(n).encode(), []) for n in range(10)])
    with psycopg.connect(db_url) as conn:
        write_batch(conn, [], [], settings.ingest_group, {(topic, 0): 7})
    runtime = consumer(settings)
    try:
        events, _ = drain(runtime, 3)
        wait_until(lambda: (runtime.poll(100), runtime.caught_up())[1], 10, "caught up")
    finally:
        runtime.close()
    assert events == [b"7", b"8", b"9"]


def test_waiting_paused_past_max_poll_interval_keeps_the_group(settings, db_url):
    ensure_topics(settings)
    topic = topics.interactions(settings.topic_prefix)
    runtime = consumer(settings, kafka_max_poll_interval_ms=2_000)
    group = settings.ingest_group
    try:
        wait_until(lambda: (runtime.poll(100), runtime.joined)[1], 30, "joined")
        assigned = REBALANCES.labels(group, "assigned")._value.get()
        produce_raw(settings, topic, 0, [(b"k", b"x", [])])
        runtime.hold()
        for _ in range(6):  # three times max.poll.interval.ms, never fetching
            assert not runtime.poll(1_000)
        assert runtime.consumer.paused() == runtime.consumer.assignment()
        assert not runtime.idle(3.0)  # a retry's wait: polls, paused
        runtime.release()
        events, _ = drain(runtime, 1)
        assert events == [b"x"]
        assert REBALANCES.labels(group, "assigned")._value.get() == assigned
        assert REBALANCES.labels(group, "revoked")._value.get() == 0
        assert TopicPartition(topic, 0) in runtime.consumer.assignment()
    finally:
        runtime.close()
