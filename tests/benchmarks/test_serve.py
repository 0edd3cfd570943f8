"""The serving benchmark end to end on a few images: it measures what the README quotes,
so it must keep running as the services change (it broke once on the image policy)."""

from __future__ import annotations

from benchmarks.serve import run_embed
from shared.settings import Settings


def test_the_serving_benchmark_measures_backfill_and_freshness(pg_admin_url, broker,
                                                                milvus_uri, tmp_path):
    base = Settings(database_url=pg_admin_url, kafka_bootstrap=broker, milvus_uri=milvus_uri,
                    data_dir=tmp_path, kafka_session_timeout_ms=6000,
                    kafka_heartbeat_interval_ms=2000, log_format="text")
    result = run_embed(base, images=24, events=3, backbone="small",
                       backfill={"rate": 5.0, "train_load": False, "threads": 1})
    assert result["embed"]["images"] == 24
    assert result["embed"]["backfill_s"] > 0
    fresh, during = result["freshness"], result["during_backfill"]
    assert 0 < fresh["p50_s"] <= fresh["p99_s"] <= fresh["max_s"] < 60
    assert during["events"] > 0 and during["backfill_s"] > 0
