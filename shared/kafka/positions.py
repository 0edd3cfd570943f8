"""Where a group consumer stands on its assigned partitions, judged by the high watermark
that fetch responses carry (ListOffsets may under-report on some brokers)."""

from __future__ import annotations

import logging

from kafka import KafkaConsumer
from prometheus_client import Gauge

log = logging.getLogger(__name__)


def caught_up(consumer: KafkaConsumer) -> bool:
    """True when every assigned partition has been read to its high watermark."""
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None or consumer.position(tp) < high:
            return False
    return True


def rewind_truncated(consumer: KafkaConsumer) -> None:
    """A log that ends before our position was recreated or truncated on the broker.

    Kafka answers such a fetch with OffsetOutOfRange and the client resets to the earliest
    offset; brokers that just return nothing would stall us forever. Reading from the
    beginning is safe: the stores downstream deduplicate replayed events.
    """
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is not None and consumer.position(tp) > high:
            log.warning("%s[%d] ends at %d, before our position %d: the topic was "
                        "recreated or truncated; reading it from the beginning",
                        tp.topic, tp.partition, high, consumer.position(tp))
            consumer.seek_to_beginning(tp)


def report_lag(consumer: KafkaConsumer, gauge: Gauge) -> None:
    """High watermark minus position, per assigned partition, into a (topic, partition)
    gauge."""
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is not None:
            gauge.labels(tp.topic, str(tp.partition)).set(max(0, high - consumer.position(tp)))
