"""Prometheus metrics of the ingest service."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("cofeat_ingest_events_total", "Events consumed", ["topic", "result"])
BATCH_SECONDS = Histogram("cofeat_ingest_batch_seconds", "Time to store one batch",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
BATCH_SIZE = Histogram("cofeat_ingest_batch_events", "Events per stored batch",
                       buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 20000))
LAG = Gauge("cofeat_ingest_lag", "High watermark minus position", ["topic", "partition"])
STORE_ERRORS = Counter("cofeat_ingest_store_errors_total", "Failed batch writes (retried)")
