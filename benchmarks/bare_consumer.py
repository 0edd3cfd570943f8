"""The bare kafka-python consumer that benchmarks/ingest.py compares ingest with: the same
group settings, reading the interactions topic until every partition is caught up, doing
nothing with the records. Run as its own process so it is timed like `cofeat ingest`,
start and group join included.

    python -m benchmarks.bare_consumer   (COFEAT_* settings as for ingest)
"""

from __future__ import annotations

import json
import sys
import time

from kafka import KafkaConsumer

from shared import topics
from shared.kafka.config import consumer_config
from shared.kafka.positions import caught_up
from shared.settings import load_settings


def main() -> None:
    settings = load_settings()
    consumer = KafkaConsumer(**consumer_config(settings, settings.ingest_group))
    consumer.subscribe([topics.interactions(settings.topic_prefix)])
    records = 0
    while True:
        batch = consumer.poll(timeout_ms=settings.ingest_poll_timeout_ms,
                              max_records=settings.ingest_max_records)
        records += sum(len(part) for part in batch.values())
        if consumer.assignment() and caught_up(consumer):
            break
    consumer.close(autocommit=False)
    json.dump({"records": records, "cpu_s": time.process_time()}, sys.stdout)


if __name__ == "__main__":
    main()
