"""`cofeat embed` as a service: stream to searchable, updates, deletes, bad images, swaps."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request

import numpy as np
import psycopg

from shared import milvus as contract
from shared.events import ProjectEvent
from shared.kafka.admin import ensure_topics
from tests.conftest import free_port
from tests.helpers import Producer, RawHeaderKey, wait_until
from tests.services.embedder.conftest import (
    NOW_MS,
    alias_target,
    client,
    expected_vectors,
    failures,
    make_cnn,
    make_corrupt,
    make_factors,
    make_image,
    promote,
    rows,
    seed_projects,
    settle,
    start_embed,
    start_ingest,
)

PROJECTS = contract.PROJECTS


def event(kind: str, project_id: int, uri: str, n: int = 0) -> ProjectEvent:
    return ProjectEvent(f"{kind}-{project_id}-{n}", kind, project_id, 7, uri, NOW_MS())


def visible(c, alias: str, ids) -> set[int]:
    """Ids a query through the alias finds with the default (Bounded) consistency."""
    found = c.query(alias, filter=f"project_id in {list(ids)}", output_fields=["project_id"])
    return {r["project_id"] for r in found}


def metric(port: int, prefix: str, having: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = [line for line in response.read().decode().splitlines()
                 if line.startswith(prefix) and having in line]
    return sum(float(line.split()[-1]) for line in lines)


def test_stream_publish_update_delete_and_bad_images(esettings, db_url, tmp_path):
    settings = esettings
    ensure_topics(settings)
    seed_projects(settings, db_url, 10)
    v1 = make_cnn(settings, db_url, seed=1, factor_version=make_factors(settings, db_url, [1]))
    port = free_port()
    proc = start_embed(settings, tmp_path / "embed.log", COFEAT_METRICS_PORT=str(port))
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    c, producer = client(settings), Producer(settings)
    alias = contract.alias(settings, PROJECTS)
    images = settings.data_dir / "images"
    try:
        wait_until(lambda: alias_target(c, settings, PROJECTS) is not None, 90, "backfill")
        # publish -> searchable, one at a time. How fast is benchmarks/serve.py's question: the
        # first event here also waits for ingest to join its group, so the wait is generous.
        latencies = []
        for pid in range(200, 206):
            uri = make_image(images / f"{pid}.png", pid)
            started = time.monotonic()
            producer.projects_([event("published", pid, uri)])
            producer.flush()
            wait_until(lambda pid=pid: pid in visible(c, alias, [pid]), 60, f"{pid} visible")
            latencies.append(time.monotonic() - started)
        print(f"publish -> searchable: {[round(x, 2) for x in latencies]}")

        # update -> the new image's vector; delete -> gone
        new_uri = make_image(images / "1-new.png", 999)
        producer.projects_([event("updated", 1, new_uri), event("deleted", 2, "/gone.png")])
        # corrupt -> retried, parked; the stream goes on with the next event
        producer.projects_([event("published", 300, make_corrupt(images / "300.png"))])
        producer.raw(producer.projects, b"301", b"not json")  # invalid: skipped, counted
        producer.flush()
        # Records the client cannot decode, or that it refuses to send itself: skipped too.
        producer.unchecked(producer.projects, b"303", b"{}", [(RawHeaderKey(b"\xff"), b"")])
        producer.unchecked(producer.projects, None, None)
        producer.projects_([event("published", 302, make_image(images / "302.png", 302))])
        producer.flush()
        wait_until(lambda: visible(c, alias, [1, 2, 302]) == {1, 302}, 30, "update/delete")
        want = expected_vectors(settings, v1, [new_uri])[0]
        wait_until(lambda: np.dot(rows(c, alias, [1])[1]["embedding"], want) > 0.999, 10,
                   "the updated vector")
        wait_until(lambda: failures(db_url).get(300, (0,))[0] == settings.embed_max_attempts,
                   20, "the corrupt image parked")
        assert "Error" in failures(db_url)[300][1]  # the reason, e.g. OSError: ...
        assert 300 not in visible(c, alias, [300])

        # a fixed image for the parked project clears its failure row
        producer.projects_([event("updated", 300, make_image(images / "300-ok.png", 3), 1)])
        producer.flush()
        wait_until(lambda: 300 in visible(c, alias, [300]), 30, "the fixed image")
        wait_until(lambda: 300 not in failures(db_url), 30, "the failure row cleared")

        assert metric(port, "cofeat_embed_freshness_seconds_count") >= 9
        # Freshness taken apart: each applied event was polled and passed the ingest gate.
        assert metric(port, "cofeat_embed_polled_age_seconds_count") >= 9
        assert metric(port, "cofeat_embed_ingest_wait_seconds_count") >= 9
        assert metric(port, "cofeat_embed_loop_part_seconds_count",
                      'part="Embedder.stream_step"') > 0
        assert metric(port, 'cofeat_embed_events_total{result="invalid"}') == 3
        assert metric(port, "cofeat_consumer_records_total", 'kind="corrupt_record"') == 1
        assert metric(port, "cofeat_embed_parked_total") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as health:
            assert health.status == 200
    finally:
        producer.close()
        proc.send_signal(signal.SIGTERM)
        ingest.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        ingest.wait(30)
        c.close()
    assert code == 0
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT sum(next_offset) FROM consumer_offsets WHERE group_id = "
                              "%s", (settings.embed_group,)).fetchone()[0]
    assert stored == 6 + 2 + 5 + 1  # every event, the invalid ones included


def test_model_swap_while_streaming(esettings, db_url, tmp_path):
    settings = esettings.model_copy(update={"embed_backfill_chunk": 4})
    ensure_topics(settings)
    seeds = seed_projects(settings, db_url, 40)
    v1 = make_cnn(settings, db_url, seed=1)
    proc = start_embed(settings, tmp_path / "embed.log")
    ingest = start_ingest(settings, tmp_path / "ingest.log")
    c, producer = client(settings), Producer(settings)
    alias = contract.alias(settings, PROJECTS)
    images = settings.data_dir / "images"
    published, deleted, stop = [], [], threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            pid = 1000 + n
            producer.projects_([event("published", pid, make_image(images / f"{pid}.png", n))])
            published.append(pid)
            if n % 4 == 0 and n // 4 + 1 in seeds:
                producer.projects_([event("deleted", n // 4 + 1, "/gone.png")])
                deleted.append(n // 4 + 1)
            producer.flush()
            n += 1
            time.sleep(0.1)

    try:
        wait_until(lambda: alias_target(c, settings, PROJECTS) is not None, 90, "v1 backfill")
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        time.sleep(1.0)
        v2 = make_cnn(settings, db_url, seed=2, promoted=False)
        promote(db_url, v2)
        new = f"{settings.milvus_prefix}{PROJECTS}_v{v2}"
        wait_until(lambda: alias_target(c, settings, PROJECTS) == new, 90, "the swap to v2")
        time.sleep(1.0)
        stop.set()
        thread.join(10)
        expected = (set(seeds) - set(deleted)) | set(published)
        wait_until(lambda: set(rows(c, alias)) == expected, 15, "every event in v2")
        assert {r["model_version"] for r in rows(c, alias).values()} == {v2}
        assert v1 != v2
        # The stream kept writing during the backfill, into both collections, and the
        # collection matched Postgres id by id before the alias moved.
        assert re.search(rf"verified \S+_v{v2} against Postgres: no missing, extra or stale",
                         (tmp_path / "embed.log").read_text())
    finally:
        stop.set()
        producer.close()
        proc.send_signal(signal.SIGTERM)
        ingest.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        ingest.wait(30)
        c.close()
    assert code == 0


def test_refuses_bad_settings_and_old_schema(esettings, db_url, tmp_path):
    from alembic import command

    from shared.db.engine import alembic_config

    log = tmp_path / "embed.log"
    proc = start_embed(esettings, log, COFEAT_EMBED_MAX_ATTEMPTS="0")
    assert proc.wait(60) == 2
    assert "COFEAT_EMBED_MAX_ATTEMPTS" in log.read_text()
    command.downgrade(alembic_config(db_url), "0001")
    proc = start_embed(esettings, log)
    assert proc.wait(60) == 3
    assert "run `cofeat migrate`" in log.read_text()


def test_the_stream_is_polled_again_after_a_long_part(esettings, db_url):
    """An event waits behind one long part of the loop, never behind a whole turn; short
    parts do not each cost a stream batch."""
    from services.embedder import service
    from services.embedder.service import Embedder

    seed_projects(esettings, db_url, 2)
    make_cnn(esettings, db_url, seed=1)
    embedder = Embedder(esettings)
    try:
        embedder.start()
        settle(embedder)
        calls: list[str] = []
        stream_step = embedder.stream.step
        embedder.stream.step = lambda timeout: (calls.append("stream"), stream_step(timeout))

        def long_part(name, original):
            def run():
                calls.append(name)
                time.sleep(service.STREAM_AGAIN_AFTER_S * 1.5)
                return original()
            return run

        def short_part(name, original):
            return lambda: (calls.append(name), original())

        lifecycle = embedder.lifecycle
        lifecycle.backfill_step = long_part("backfill", lifecycle.backfill_step)
        embedder.retry_step = short_part("retry", embedder.retry_step)
        lifecycle.drop_retired = short_part("drop", lifecycle.drop_retired)
        embedder.warmup.step = long_part("warm", embedder.warmup.step)
        embedder.turn()
        assert calls == ["stream", "backfill", "stream", "retry", "drop", "warm", "stream"]
    finally:
        embedder.close()
