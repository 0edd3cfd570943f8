"""Milvus converges to the store, case by case, against the real broker, Postgres and
Milvus: the embedder runs in process, turn by turn, and ingest's own store function stores
events exactly when each test says, so every interleaving below is the one named."""

from __future__ import annotations

import numpy as np
import pytest

from services.embedder import metrics
from services.embedder.service import Embedder
from shared import milvus as contract
from shared.events import ProjectEvent
from shared.kafka.admin import ensure_topics
from tests.services.embedder.conftest import (
    NOW_MS,
    Platform,
    client,
    expected_vectors,
    held,
    live_ids,
    make_cnn,
    make_image,
    promote,
    rows,
    settle,
)

PROJECTS = contract.PROJECTS


@pytest.fixture
def platform(esettings, db_url):
    ensure_topics(esettings)
    p = Platform(esettings, db_url)
    yield p
    p.close()


@pytest.fixture
def embedders():
    """Embedders a test starts; each is closed at the end."""
    started: list[Embedder] = []

    def start(settings) -> Embedder:
        embedder = Embedder(settings)
        embedder.start()
        started.append(embedder)
        return embedder

    yield start
    for embedder in started:
        embedder.close()


class Events:
    """Project events with increasing timestamps, images made on the fly."""

    def __init__(self, settings):
        self.images = settings.data_dir / "images"
        self.images.mkdir(exist_ok=True)
        self.ts, self.n = NOW_MS() - 600_000, 0

    def __call__(self, kind: str, pid: int, seed: int | None = None,
                 ts: int | None = None) -> ProjectEvent:
        self.n += 1
        self.ts += 1000
        uri = make_image(self.images / f"{pid}-{self.n}.png", seed if seed is not None
                         else self.n)
        return ProjectEvent(f"{kind}-{pid}-{self.n}", kind, pid, 7, uri,
                            self.ts if ts is None else ts)


def alias_rows(settings) -> dict[int, int]:
    c = client(settings)
    try:
        return held(c, contract.alias(settings, PROJECTS))
    finally:
        c.close()


def assert_converged(settings, db_url) -> None:
    assert alias_rows(settings) == live_ids(db_url)


def vector_of(settings, pid: int) -> np.ndarray:
    c = client(settings)
    try:
        return np.asarray(rows(c, contract.alias(settings, PROJECTS), [pid])[pid]["embedding"])
    finally:
        c.close()


def test_delete_then_republish_in_the_backlog_when_a_model_goes_live(
        esettings, db_url, platform, embedders):
    ev = Events(esettings)
    platform.send(*(ev("published", pid) for pid in (1, 2, 3)))
    platform.ingest()
    make_cnn(esettings, db_url, seed=1)
    first = embedders(esettings)
    settle(first, platform)
    first.close()
    # While no embedder runs: 2 is deleted and published again, 3 deleted, 4 comes and
    # goes and comes back; then a new model is promoted over that backlog.
    deleted = ev("deleted", 2)
    again = ev("published", 2, seed=22)
    platform.send(deleted, again, ev("deleted", 3), ev("published", 4), ev("deleted", 4),
                  ev("published", 4, seed=44))
    platform.ingest()
    v2 = make_cnn(esettings, db_url, seed=2)
    second = embedders(esettings)
    settle(second, platform)
    assert second.lifecycle.live.encoder.version == v2
    assert set(alias_rows(esettings)) == {1, 2, 4}
    assert_converged(esettings, db_url)
    want = expected_vectors(esettings, v2, [again.image_uri])[0]
    assert np.dot(vector_of(esettings, 2), want) > 0.999


def test_duplicate_and_stale_events_after_a_restart_change_nothing(
        esettings, db_url, platform, embedders):
    ev = Events(esettings)
    published, updated = ev("published", 1, seed=1), ev("updated", 1, seed=2)
    platform.send(published, updated)
    platform.ingest()
    version = make_cnn(esettings, db_url, seed=1)
    first = embedders(esettings)
    settle(first, platform)
    first.close()
    before = metrics.ALREADY_WRITTEN._value.get()
    # After a restart (no memory of what came before): the same published event again,
    # and an update older than the state Postgres holds.
    stale = ev("updated", 1, seed=3, ts=published.ts_ms - 1)
    platform.send(published, stale)
    platform.ingest()
    second = embedders(esettings)
    settle(second, platform)
    assert_converged(esettings, db_url)
    want = expected_vectors(esettings, version, [updated.image_uri])[0]
    assert np.dot(vector_of(esettings, 1), want) > 0.999  # still the newest image
    assert metrics.ALREADY_WRITTEN._value.get() > before  # looked at, not embedded again


def test_ingest_lagging_behind_the_embedder_during_a_backfill(
        esettings, db_url, platform, embedders):
    settings = esettings.model_copy(update={"embed_backfill_chunk": 2,
                                            "embed_ingest_wait_s": 600.0})
    ev = Events(settings)
    platform.send(*(ev("published", pid) for pid in range(1, 9)))
    platform.ingest()
    make_cnn(settings, db_url, seed=1)
    embedder = embedders(settings)
    settle(embedder, platform)
    # Changes reach the topic, not yet the store; then a new model goes live.
    platform.send(ev("updated", 1), ev("deleted", 2), ev("published", 9), ev("deleted", 3),
                  ev("published", 3, seed=33), ev("updated", 8))
    v2 = make_cnn(settings, db_url, seed=2)
    settle(embedder, until=lambda: (embedder.lifecycle.backfill is not None
                                    and embedder.lifecycle.backfill.phase == "fill"))
    for _ in range(3):
        embedder.turn()  # some pages written while ingest stands still
    assert len(embedder.stream.gate) == 6  # nothing applied ahead of the store
    platform.ingest(3)
    for _ in range(3):
        embedder.turn()
    platform.ingest()
    settle(embedder, platform)
    assert embedder.lifecycle.live.encoder.version == v2
    assert set(alias_rows(settings)) == {1, 3, 4, 5, 6, 7, 8, 9}
    assert_converged(settings, db_url)


def test_an_update_read_before_ingest_stored_the_publish_waits_for_it(
        esettings, db_url, platform, embedders):
    ev = Events(esettings)
    platform.send(ev("published", 1))
    platform.ingest()
    version = make_cnn(esettings, db_url, seed=1)
    embedder = embedders(esettings)
    settle(embedder, platform)
    published, updated = ev("published", 5, seed=50), ev("updated", 5, seed=51)
    platform.send(published, updated)
    settle(embedder, until=lambda: len(embedder.stream.gate) == 2)
    for _ in range(5):
        embedder.turn()
    assert 5 not in alias_rows(esettings)  # nothing to write before the store has it
    platform.ingest(1)  # the publish only
    settle(embedder, until=lambda: len(embedder.stream.gate) == 1)
    assert 5 in alias_rows(esettings)
    platform.ingest()
    settle(embedder, platform)
    assert_converged(esettings, db_url)
    want = expected_vectors(esettings, version, [updated.image_uri])[0]
    assert np.dot(vector_of(esettings, 5), want) > 0.999
    assert not embedder.lifecycle.failed
    promote(db_url, version)  # unchanged: no new backfill
    embedder.turn()
    assert embedder.lifecycle.backfill is None
