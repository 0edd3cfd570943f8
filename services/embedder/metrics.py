"""Prometheus metrics of the embedder."""

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import MODEL_VERSION

EVENTS = Counter("cofeat_embed_events_total", "Project events consumed: applied, failed, "
                 "invalid, released (applied before ingest had stored them)", ["result"])
# Fine steps around the goal: the demo reports quantiles as bucket bounds.
AGE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 30, 60, 300,
               3600)
FRESHNESS = Histogram(
    "cofeat_embed_freshness_seconds",
    "Project event produced (Kafka timestamp) to Milvus acknowledging its write",
    buckets=AGE_BUCKETS)
# Freshness, taken apart: how old an event is when the stream polls it, and how long it
# then waits for ingest to store it; the rest is the write.
POLLED_AGE = Histogram(
    "cofeat_embed_polled_age_seconds",
    "Project event produced (Kafka timestamp) to the embedder polling it",
    buckets=AGE_BUCKETS)
INGEST_WAIT = Histogram(
    "cofeat_embed_ingest_wait_seconds",
    "Project event polled to ingest having stored it (or the wait running out)",
    buckets=AGE_BUCKETS)
LOOP_PART = Histogram(
    "cofeat_embed_loop_part_seconds",
    "One embedder loop part's turn: events polled meanwhile wait behind it", ["part"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
IMAGES = Counter("cofeat_embed_images_total", "Images embedded", ["phase"])
ALREADY_WRITTEN = Counter("cofeat_embed_already_written_total",
                          "Changes not embedded again: the collection held that state")
DRIFT = Gauge("cofeat_embed_drift", "Ids the last reconciliation found wrong in the live "
              "collection, confirmed twice, before repairing them", ["kind"])
DRIFT_REPAIRED = Counter("cofeat_embed_drift_repaired_total",
                         "Ids the periodic reconciliation repaired")
IMAGES_PER_SECOND = Gauge("cofeat_embed_images_per_second",
                          "Images/s over the last reporting interval", ["phase"])
IMAGE_FAILURES = Counter("cofeat_embed_image_failures_total",
                         "Images that could not be read or decoded (each attempt)")
PARKED = Counter("cofeat_embed_parked_total", "Projects parked after their last attempt")
MILVUS_ERRORS = Counter("cofeat_embed_milvus_errors_total", "Failed Milvus calls (retried)")
DB_ERRORS = Counter("cofeat_embed_db_errors_total", "Failed database calls (retried)")
LIVE_MODEL = Gauge("cofeat_embed_live_model_version", "CNN version behind the projects alias")
BACKFILL_ROWS = Gauge("cofeat_embed_backfill_rows", "Rows written into the collection being built")
SWAPS = Counter("cofeat_embed_alias_swaps_total", "Alias moves", ["kind"])
INDEX_WAIT_EXCEEDED = Counter(
    "cofeat_embed_index_wait_exceeded_total",
    "Backfills swapped in before their index caught up (COFEAT_EMBED_INDEX_WAIT_S)")
DROPS = Counter("cofeat_embed_collections_dropped_total", "Replaced collections dropped")
LAG = Gauge("cofeat_embed_lag", "High watermark minus position", ["topic", "partition"])
LEADER = Gauge("cofeat_embed_leader", "1 while this replica holds the embedder lock, "
               "0 while it waits as a standby")


def live_model(version: int) -> None:
    LIVE_MODEL.set(version)
    MODEL_VERSION.labels("cnn", "embed").set(version)


WARM_PROJECTS = Counter("cofeat_embed_warm_projects_total",
                        "Warm-up vectors of new projects written (a fold-in each)")
