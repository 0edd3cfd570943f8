"""The factor refresh on the simulator's tiny world, loaded through the real store."""

from shared.settings import Settings
from tests.world import load

K = 20


def test_full_then_incremental_on_the_simulated_world(db_url, tiny_world, tmp_path):
    settings = Settings(database_url=db_url, data_dir=tmp_path / "data", als_factors=16,
                        als_iterations=10, filter_min_user_count=2, filter_min_item_count=2,
                        filter_top_user_pct=0.5, filter_top_item_pct=0.5, eval_fraction=0.5,
                        refresh_promote_margin=1.0, refresh_drift_threshold=0.5,
                        log_format="text")
    from services.refresh.factors.service import run_factors_once

    load(db_url, tiny_world / "events", stop=0.9)
    full = run_factors_once(settings, full=True)
    assert (full.status, full.mode) == ("promoted", "full")
    assert full.metrics[f"recall@{K}"] > full.metrics[f"popular_recall@{K}"], full.metrics
    assert full.stats["density_after"] > full.stats["density_before"]  # filtering dropped
    # the least active users and projects, as the paper's pre-processing does

    load(db_url, tiny_world / "events", start=0.9, stop=1.0)
    step = run_factors_once(settings)
    assert step.status == "promoted" and step.mode == "incremental", step.reason
