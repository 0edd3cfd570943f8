"""Prometheus metrics of the factor refresh (served by shared.metrics.serve_metrics)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

STEP_SECONDS = Histogram(
    "cofeat_factors_step_seconds", "Duration of each factor refresh step", ["step"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
MATRIX_SIZE = Gauge("cofeat_factors_matrix_size",
                    "Training matrix users, projects and non-zeros, before and after filtering",
                    ["stage", "dimension"])
VERSIONS = Counter("cofeat_factors_versions_total", "Factor refresh outcomes",
                   ["mode", "status"])
QUALITY = Gauge("cofeat_factors_heldout", "Held-out ranking quality of the latest version",
                ["model", "metric"])
CHANGED_ROWS = Gauge("cofeat_factors_changed_rows", "Rows re-solved by the latest refresh",
                     ["side"])


@contextlib.contextmanager
def timed(step: str, timings: dict) -> Iterator[None]:
    """Time a step into the histogram, the version's stats (wall and CPU) and the log."""
    start, cpu_start = time.perf_counter(), time.process_time()
    yield
    seconds = time.perf_counter() - start
    timings[step] = round(seconds, 3)
    # CPU seconds of all threads: comparable between runs on a shared, busy machine.
    timings[f"{step}_cpu"] = round(time.process_time() - cpu_start, 3)
    STEP_SECONDS.labels(step).observe(seconds)
    log.info("%s took %.2f s", step, seconds)


def record_matrix(stats: dict) -> None:
    for stage in ("before", "after"):
        users, items = stats[f"shape_{stage}"]
        MATRIX_SIZE.labels(stage, "users").set(users)
        MATRIX_SIZE.labels(stage, "items").set(items)
        MATRIX_SIZE.labels(stage, "nnz").set(stats[f"nnz_{stage}"])


def record_quality(metrics: dict, k: int) -> None:
    for model, prefix in (("als", ""), ("popular", "popular_")):
        for metric in (f"recall@{k}", f"map@{k}"):
            value = metrics.get(prefix + metric)
            if value is not None:
                QUALITY.labels(model, metric).set(value)
