import psycopg
import pytest

from shared.settings import Settings
from tests.services.refresh.factors.synth import store_events, taste_world

# Tiny and fast: 16 factors, few iterations, loose filters, a large evaluation sample.
TEST_SETTINGS = dict(
    als_factors=16, als_iterations=8, als_regularization=0.1, als_threads=2,
    filter_min_user_count=2, filter_min_item_count=2, filter_top_user_pct=0.5,
    filter_top_item_pct=0.5, eval_fraction=0.5, log_format="text")


@pytest.fixture
def make_settings(db_url, data_dir):
    def make(**overrides) -> Settings:
        return Settings(database_url=db_url, data_dir=data_dir,
                        **{**TEST_SETTINGS, **overrides})
    return make


@pytest.fixture
def world():
    return taste_world(users=300, items=400, events=15_000, seed=1)


@pytest.fixture
def stored_world(db_url, world):
    with psycopg.connect(db_url) as conn:
        store_events(conn, world)
    return world
