"""Gauges every refresh kind (factors, cnn) reports; defined once so both can share them
in one process (prometheus_client refuses a second registration of a name)."""

from __future__ import annotations

import time

from prometheus_client import Gauge

from shared.metrics import MODEL_VERSION

LAST_SUCCESS = Gauge("cofeat_refresh_last_success_timestamp_seconds",
                     "When the last version was promoted", ["kind"])
LAST_DURATION = Gauge("cofeat_refresh_last_duration_seconds", "Wall time of the last run",
                      ["kind"])


def record_run(kind: str, seconds: float, status: str, version_id: int | None) -> None:
    LAST_DURATION.labels(kind).set(seconds)
    if status == "promoted" and version_id is not None:
        LAST_SUCCESS.labels(kind).set(time.time())
        MODEL_VERSION.labels(kind, "refresh").set(version_id)
