"""Backfill and alias swap, in process, against the real Milvus and Postgres."""

from __future__ import annotations

import threading
import time

import numpy as np

from services.embedder.service import Embedder
from shared import milvus as contract
from shared.kafka.admin import ensure_topics
from tests.services.embedder.conftest import (
    alias_target,
    client,
    failures,
    insert_projects,
    make_cnn,
    make_corrupt,
    make_factors,
    seed_projects,
)

PROJECTS, USERS = contract.PROJECTS, contract.USERS


def drain(settings) -> int:
    return Embedder(settings, drain=True).run()


def count(c, name: str) -> int:
    return c.query(name, filter="", output_fields=["count(*)"],
                   consistency_level="Strong")[0]["count(*)"]


class QueryLoop(threading.Thread):
    """Searches through the alias without pause, recording what each response held."""

    def __init__(self, settings):
        super().__init__(daemon=True)
        self.settings, self.stop = settings, threading.Event()
        self.responses: list[tuple[int, frozenset]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        c = client(self.settings)
        alias = contract.alias(self.settings, PROJECTS)
        query = np.ones(8, np.float32) / np.sqrt(8)
        while not self.stop.is_set():
            try:
                hits = c.search(alias, data=[query.tolist()], limit=100,
                                output_fields=["model_version"],
                                search_params={"metric_type": "COSINE", "params": {"ef": 128}})
                versions = frozenset(h["entity"]["model_version"] for h in hits[0])
                self.responses.append((len(hits[0]), versions))
            except Exception as error:  # recorded and asserted on below
                self.errors.append(f"{type(error).__name__}: {error}")
        c.close()


def test_backfill_then_swap_under_concurrent_queries(esettings, db_url):
    settings = esettings.model_copy(update={"embed_drop_grace_s": 30.0})
    ensure_topics(settings)
    seed_projects(settings, db_url, 30)
    insert_projects(db_url, [(31, 5, make_corrupt(settings.data_dir / "images" / "bad.png"))])
    factors = make_factors(settings, db_url, range(1, 21))
    v1 = make_cnn(settings, db_url, seed=1, factor_version=factors)

    assert drain(settings) == 0
    c = client(settings)
    assert alias_target(c, settings, PROJECTS) == f"{settings.milvus_prefix}{PROJECTS}_v{v1}"
    assert alias_target(c, settings, USERS) == f"{settings.milvus_prefix}{USERS}_v{v1}"
    assert count(c, contract.alias(settings, PROJECTS)) == 30  # the corrupt one is parked
    assert count(c, contract.alias(settings, USERS)) == 20
    assert failures(db_url)[31][0] == settings.embed_max_attempts

    loop = QueryLoop(settings)
    loop.start()
    v2 = make_cnn(settings, db_url, seed=2, factor_version=factors)
    assert drain(settings) == 0
    loop.stop.set()
    loop.join(10)

    assert not loop.errors, loop.errors[:3]
    assert len(loop.responses) > 10
    assert all(len(versions) == 1 for _, versions in loop.responses)  # never a mix
    assert all(n == 30 for n, _ in loop.responses)  # never a half-filled collection
    seen = [next(iter(v)) for _, v in loop.responses]
    assert seen[-1] == v2 and set(seen) <= {v1, v2}
    assert seen == sorted(seen)  # once on v2, never back
    old = f"{settings.milvus_prefix}{PROJECTS}_v{v1}"
    assert c.has_collection(old)  # still inside its grace period

    # A later run finds the unaliased old collections and drops them after the grace.
    assert drain(settings.model_copy(update={"embed_drop_grace_s": 0.0})) == 0
    assert not c.has_collection(old)
    assert not c.has_collection(f"{settings.milvus_prefix}{USERS}_v{v1}")
    assert count(c, contract.alias(settings, PROJECTS)) == 30
    c.close()


def test_crashed_backfill_keeps_old_alias_and_restart_rebuilds(esettings, db_url):
    settings = esettings.model_copy(update={"embed_backfill_chunk": 4})
    ensure_topics(settings)
    seed_projects(settings, db_url, 20)
    factors = make_factors(settings, db_url, range(1, 11))
    v1 = make_cnn(settings, db_url, seed=1, factor_version=factors)
    assert drain(settings) == 0
    c = client(settings)
    alias = contract.alias(settings, PROJECTS)

    # v2 serves penultimate features: 128-d, not factor space.
    v2 = make_cnn(settings, db_url, seed=2, feature="penultimate", factor_version=factors)
    crashed = Embedder(settings, drain=True)
    crashed.start()
    crashed.lifecycle.check_model()
    while crashed.lifecycle.backfill.images < 8:
        crashed.lifecycle.backfill.step()
    crashed.milvus.close()  # dies here: no verification, no swap
    partial = f"{settings.milvus_prefix}{PROJECTS}_v{v2}"
    assert count(c, partial) == 8
    assert alias_target(c, settings, PROJECTS) == f"{settings.milvus_prefix}{PROJECTS}_v{v1}"
    assert count(c, alias) == 20

    assert drain(settings) == 0  # drops the partial collection and fills it again
    assert alias_target(c, settings, PROJECTS) == partial
    assert count(c, alias) == 20
    described = c.describe_collection(alias)
    dims = [f["params"]["dim"] for f in described["fields"] if f["name"] == "embedding"]
    assert dims == [128]
    assert alias_target(c, settings, USERS) is None  # no users space for penultimate
    assert not c.has_collection(f"{settings.milvus_prefix}{PROJECTS}_v{v1}")  # grace 0
    assert not c.has_collection(f"{settings.milvus_prefix}{USERS}_v{v1}")
    c.close()


def test_a_collection_of_an_older_schema_is_rebuilt_beside_it(esettings, db_url):
    """Written by a cofeat before state versions: the alias is on it, so it is not rebuilt
    in place; the same model fills `..._v<model>_1`, the alias moves, the old one goes."""
    from pymilvus import DataType, MilvusClient

    ensure_topics(esettings)
    seed_projects(esettings, db_url, 5)
    version = make_cnn(esettings, db_url, seed=1)
    c = client(esettings)
    old = f"{esettings.milvus_prefix}{PROJECTS}_v{version}"
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("project_id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=8)
    schema.add_field("model_version", DataType.INT64)
    c.create_collection(old, schema=schema)
    c.create_alias(old, contract.alias(esettings, PROJECTS))
    assert drain(esettings) == 0
    assert alias_target(c, esettings, PROJECTS) == f"{old}_1"
    assert count(c, contract.alias(esettings, PROJECTS)) == 5
    assert not c.has_collection(old)
    c.close()


def test_an_index_that_never_catches_up_delays_the_swap_only_so_long(esettings, db_url):
    """Rows Milvus never persists (here: a collection that was never sealed) keep
    describe_index at 0 indexed of 0 rows, as when every sealed row was deleted and
    compacted away: the backfill waits COFEAT_EMBED_INDEX_WAIT_S, then swaps loaded."""
    import time

    import psycopg

    from services.embedder import collections as mv
    from services.embedder.backfill import Backfill
    from services.embedder.encode import Encoder
    from services.embedder.writer import Target, Writer
    from shared.cnn import cnn_version

    settings = esettings.model_copy(update={"embed_index_wait_s": 30.0})
    version = make_cnn(settings, db_url, seed=2)
    milvus = mv.Milvus(settings)
    with psycopg.connect(db_url, autocommit=True) as conn:
        target = Target(contract.collection_name(settings, PROJECTS, version),
                        Encoder(settings, cnn_version(conn, version)))
        backfill = Backfill(settings, milvus, lambda: conn, Writer(settings, milvus), target,
                            True, False)
        backfill.start()  # created, indexed and loading
        name = backfill.projects
        while mv.ensure_loading(milvus, name) != "Loaded":
            time.sleep(0.2)
        rows_in = [{"project_id": i, "embedding": [1.0] + [0.0] * 7, "model_version": version,
                    "owner_id": 1, "published_at": 0, "state_version": 1} for i in range(3)]
        mv.upsert(milvus, [name], rows_in, 100)
        backfill.sealed = {name: 3}
        assert not mv.index_caught_up(milvus, name)
        backfill.filled_at = time.monotonic()  # filled just now
        assert not backfill._ready(name)  # loaded, but the index has not caught up yet
        backfill.filled_at -= 31.0  # filled longer ago than the wait allows
        assert backfill._ready(name)  # swap unindexed
        backfill.abandon()
    milvus.close()


def test_the_stream_skips_states_the_backfill_already_embedded(esettings, db_url):
    """The first model going live after a backlog: the backfill embeds what Postgres holds,
    then the stream reads the same events again; it looks each project's state version up
    and embeds only what changed since (3's newer image, 50 stored after the page)."""
    from services.embedder import metrics
    from shared.events import ProjectEvent
    from shared.metrics import MODEL_VERSION
    from tests.services.embedder.conftest import (
        NOW_MS,
        Platform,
        expected_vectors,
        make_image,
        rows,
        settle,
    )

    ensure_topics(esettings)
    images, ts = esettings.data_dir / "images", NOW_MS() - 60_000
    images.mkdir(exist_ok=True)
    paths = {pid: make_image(images / f"{pid}.png", pid) for pid in range(1, 7)}
    platform = Platform(esettings, db_url)
    platform.send(*(ProjectEvent(f"p{pid}", "published", pid, 7, path, ts)
                    for pid, path in paths.items()))
    platform.ingest()
    version = make_cnn(esettings, db_url, seed=3)
    embedder = Embedder(esettings, drain=True)
    embedder.start()
    embedder.lifecycle.check_model()
    backfill = embedder.lifecycle.backfill
    while backfill.phase in ("prepare", "fill"):  # Postgres' rows first
        backfill.step()
    newer = make_image(images / "3-new.png", 33)
    platform.send(ProjectEvent("u3", "updated", 3, 7, newer, ts + 1000),
                  ProjectEvent("p50", "published", 50, 7, paths[1], ts))
    platform.ingest()
    skipped_before = metrics.ALREADY_WRITTEN._value.get()
    images_before = metrics.IMAGES.labels("stream")._value.get()
    try:
        settle(embedder, platform, timeout_s=60)
    finally:
        embedder.close()
        platform.close()

    # What the version-skew alert compares with refresh's promoted version.
    assert MODEL_VERSION.labels("cnn", "embed")._value.get() == version
    assert metrics.ALREADY_WRITTEN._value.get() - skipped_before >= 5  # 1, 2, 4, 5, 6
    assert metrics.IMAGES.labels("stream")._value.get() - images_before <= 2  # 3 and 50
    c = client(esettings)
    found = rows(c, contract.alias(esettings, PROJECTS))
    c.close()
    assert set(found) == {1, 2, 3, 4, 5, 6, 50}
    want = expected_vectors(esettings, version, [newer, paths[1]])
    assert np.dot(found[3]["embedding"], want[0]) > 0.999
    assert np.dot(found[50]["embedding"], want[1]) > 0.999


def test_a_storage_blip_parks_nothing_and_is_retried_at_the_interval(esettings, db_url,
                                                                    image_server):
    """Issue 12: an image that fails to load is retried with the configured interval, not
    three times back to back, and a passing storage blip must not park a project."""
    settings = esettings.model_copy(update={
        "image_hosts": "127.0.0.1,localhost", "image_cache_bytes": 0,
        "image_fetch_attempts": 2, "embed_retry_interval_s": 60.0})  # not within this drain
    ensure_topics(settings)
    image_server.reset()
    seed_projects(settings, db_url, 5)
    port = image_server.port
    blip = f"http://127.0.0.1:{port}/flaky/2/ok.png"  # 503 twice, then the image
    gone = f"http://localhost:{port}/status/404"  # another host: its own backoff
    insert_projects(db_url, [(6, 5, blip), (7, 5, gone)])
    make_cnn(settings, db_url, seed=1, factor_version=make_factors(settings, db_url, [1]))

    assert drain(settings) == 0
    c = client(settings)
    alias = contract.alias(settings, PROJECTS)
    assert count(c, alias) == 5
    rows = failures(db_url)
    # Tried image_fetch_attempts times in place, then left to the retry step: not parked.
    assert rows[6] == (0, "unavailable: HTTP 503")
    assert image_server.requests("flaky/2/ok.png") == 2
    # A drain retries a permanent failure at once, up to COFEAT_EMBED_MAX_ATTEMPTS.
    assert rows[7] == (settings.embed_max_attempts, "not found: HTTP 404")

    time.sleep(0.5)
    # Due 0.5 s after the failure: the storage answers again, embedded, the row cleared.
    assert drain(settings.model_copy(update={"embed_retry_interval_s": 0.5})) == 0
    assert count(c, alias) == 6 and 6 not in failures(db_url)
    assert failures(db_url)[7][0] == settings.embed_max_attempts  # still parked
    c.close()


def test_a_backfill_records_a_failure_once_and_leaves_it_to_the_interval(esettings, db_url):
    settings = esettings.model_copy(update={"embed_retry_interval_s": 60.0})
    ensure_topics(settings)
    seed_projects(settings, db_url, 4)
    insert_projects(db_url, [(9, 5, make_corrupt(settings.data_dir / "images" / "9.png"))])
    make_cnn(settings, db_url, seed=1, factor_version=make_factors(settings, db_url, [1]))
    embedder = Embedder(settings)  # the long-running embedder, not a drain
    try:
        embedder.start()
        embedder.lifecycle.check_model()
        deadline = time.monotonic() + 60
        while embedder.lifecycle.backfill is not None and time.monotonic() < deadline:
            embedder.lifecycle.backfill_step()
        assert embedder.lifecycle.live is not None, "the backfill did not finish"
        assert failures(db_url)[9][0] == 1  # once, not max_attempts times back to back
        embedder.next_retry = 0.0
        embedder.retry_step()
        assert failures(db_url)[9][0] == 1  # not due before the interval
        embedder.settings = settings.model_copy(update={"embed_retry_interval_s": 0.3})
        time.sleep(0.3)
        embedder.next_retry = 0.0
        embedder.retry_step()
        assert failures(db_url)[9][0] == 2 == settings.embed_max_attempts  # parked now
    finally:
        embedder.close()



def test_newer_models_wait_for_the_backfill_in_progress(esettings, db_url):
    """Models arriving faster than a backfill completes must not starve it: the one in
    progress goes live, then the newest one is built; the versions in between never are."""
    settings = esettings.model_copy(update={"embed_backfill_chunk": 2,
                                            "embed_model_poll_s": 0.05})
    ensure_topics(settings)
    seed_projects(settings, db_url, 40)
    v1 = make_cnn(settings, db_url, seed=1)
    embedder = Embedder(settings)
    c = client(settings)
    try:
        embedder.start()
        lifecycle = embedder.lifecycle
        while lifecycle.backfill is None:
            embedder.turn()
        assert lifecycle.backfill.version == v1 and lifecycle.live is None
        v2 = make_cnn(settings, db_url, seed=2)
        v3 = make_cnn(settings, db_url, seed=3)
        built, served = [], []
        deadline = time.monotonic() + 120
        while lifecycle.live is None or lifecycle.live.encoder.version != v3:
            assert time.monotonic() < deadline, "v3 never went live"
            embedder.turn()
            if lifecycle.backfill is not None and lifecycle.backfill.version not in built:
                built.append(lifecycle.backfill.version)
            if lifecycle.live is not None and lifecycle.live.encoder.version not in served:
                served.append(lifecycle.live.encoder.version)
        assert served == [v1, v3], "the backfill in progress was abandoned"
        assert built == [v1, v3] and v2 not in built
        assert count(c, contract.alias(settings, PROJECTS)) == 40
    finally:
        c.close()
        embedder.close()


def test_a_backfill_pages_only_the_projects_there_when_it_began_filling(esettings, db_url):
    """Projects stored after the fill began are the stream's to write: paging on past them
    would chase new projects for as long as they come faster than fill steps write them.
    The check before the swap still finds and repairs any the stream did not write (here:
    stored without an event)."""
    settings = esettings.model_copy(update={"embed_backfill_chunk": 4})
    seed_projects(settings, db_url, 12)
    version = make_cnn(settings, db_url, seed=1)
    embedder = Embedder(settings, drain=True)
    c = client(settings)
    try:
        embedder.start()
        embedder.lifecycle.check_model()
        backfill = embedder.lifecycle.backfill
        while backfill.phase == "prepare":
            backfill.step()
        seed_projects(settings, db_url, 20, start=1000)  # after the fill began
        steps = 0
        while backfill.phase == "fill":
            backfill.step()
            steps += 1
        assert count(c, backfill.projects) == 12
        assert steps <= 12 // 4 + 2  # pages of at most 4, and one to find the end
        deadline = time.monotonic() + 60
        while not backfill.step():
            assert time.monotonic() < deadline, "never ready"
        backfill.verify()  # repairs the 20, and confirms
        assert count(c, backfill.projects) == 32
        assert backfill.version == version
    finally:
        c.close()
        embedder.close()
