"""The storing loop against the real broker: every record reaches the store once, and the
GIL switch interval is short only while the loop runs."""

from __future__ import annotations

import sys

from shared import topics
from shared.kafka.admin import ensure_topics
from shared.kafka.pipeline import SWITCH_INTERVAL_S, Pipeline
from shared.kafka.runtime import Consumer, StoredOffsets
from tests.helpers import produce_raw


def test_the_loop_stores_every_record_with_a_short_switch_interval(settings, db_url):
    ensure_topics(settings)
    topic = topics.interactions(settings.topic_prefix)
    produce_raw(settings, topic, 0, [(b"k", str(n).encode(), []) for n in range(30)])
    produce_raw(settings, topic, 1, [(b"k", str(n).encode(), []) for n in range(30, 50)])
    runtime = Consumer(settings, settings.ingest_group,
                       {topic: lambda record, latest: int(record.value)},
                       StoredOffsets(settings, settings.ingest_group), max_records=7)
    stored, intervals = [], []

    def store(batch):
        intervals.append(sys.getswitchinterval())
        stored.extend(batch.of(topic))

    before = sys.getswitchinterval()
    runtime.subscribe()
    try:
        Pipeline(runtime, store, poll_timeout_ms=200, retry_max_s=1).run(lambda: False,
                                                                        drain=True)
    finally:
        runtime.close()
    assert sorted(stored) == list(range(50))
    assert len(intervals) >= 50 // 7 and set(intervals) == {SWITCH_INTERVAL_S}
    assert sys.getswitchinterval() == before
