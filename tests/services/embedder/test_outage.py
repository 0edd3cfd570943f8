"""Milvus outages, cut by a private TCP proxy (tests/proxy.py) or a real server restart:
nothing lost, offsets wait for Milvus."""

from __future__ import annotations

import signal
import time

import numpy as np
import psycopg
from pymilvus.exceptions import MilvusException

from shared import milvus as contract
from shared.kafka.admin import ensure_topics
from tests.conftest import free_port
from tests.helpers import Producer, probe, wait_until
from tests.proxy import Proxy
from tests.services.embedder.conftest import (
    alias_target,
    client,
    expected_vectors,
    make_cnn,
    make_image,
    rows,
    seed_projects,
    start_embed,
    start_ingest,
)
from tests.services.embedder.test_stream import event, visible

MAX_POLL_MS = 3_000  # the first outage below lasts three times as long


def stored_offsets(db_url: str, group: str) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets "
                            "WHERE group_id = %s", (group,)).fetchone()[0]


def test_milvus_outage_loses_nothing(esettings, db_url, tmp_path):
    proxy = Proxy(int(esettings.milvus_uri.rsplit(":", 1)[1]))
    via_proxy = esettings.model_copy(update={"milvus_uri": f"http://127.0.0.1:{proxy.port}"})
    ensure_topics(esettings)
    seed_projects(esettings, db_url, 5)
    make_cnn(esettings, db_url, seed=1)
    log = tmp_path / "embed.log"
    c, producer = client(esettings), Producer(esettings)  # the test talks to Milvus directly
    alias = contract.alias(esettings, contract.PROJECTS)
    images = esettings.data_dir / "images"

    def publish(ids) -> None:
        producer.projects_([event("published", p, make_image(images / f"{p}.png", p))
                            for p in ids])
        producer.flush()

    port = free_port()
    proc = start_embed(via_proxy, log, COFEAT_METRICS_PORT=str(port),
                       COFEAT_KAFKA_MAX_POLL_INTERVAL_MS=str(MAX_POLL_MS))
    ingest = start_ingest(esettings, tmp_path / "ingest.log")
    try:
        wait_until(lambda: alias_target(c, esettings, contract.PROJECTS) is not None, 90,
                   "backfill")
        publish([100])
        wait_until(lambda: visible(c, alias, [100]) == {100}, 10, "the stream running")
        before = stored_offsets(db_url, esettings.embed_group)
        assert probe(port, "/readyz")[0] == 200

        # 1. An outage three times max.poll.interval.ms long, ridden out in the group:
        # retries wait by polling with the partitions paused.
        proxy.cut()
        publish(range(200, 210))
        time.sleep(3 * MAX_POLL_MS / 1000)
        assert stored_offsets(db_url, esettings.embed_group) == before  # not acknowledged
        status, detail = probe(port, "/readyz")
        assert status == 503 and "milvus unavailable" in detail, detail
        assert probe(port, "/healthz")[0] == 200
        proxy.restore()
        wait_until(lambda: visible(c, alias, range(200, 210)) == set(range(200, 210)), 30,
                   "events written after the outage")
        wait_until(lambda: probe(port, "/readyz")[0] == 200, 10, "ready again")
        assert log.read_text().count(" assigned ") == 1, "evicted or rebalanced"

        # 2. Stopped during an outage: exits 0, and a restart replays what was not written.
        proxy.cut()
        publish(range(300, 310))
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert visible(c, alias, range(300, 310)) == set()
        proxy.restore()
        proc = start_embed(via_proxy, log, "--drain")
        assert proc.wait(90) == 0
        assert visible(c, alias, range(300, 310)) == set(range(300, 310))
        assert stored_offsets(db_url, esettings.embed_group) == before + 20
    finally:
        for running in (proc, ingest):
            if running.poll() is None:
                running.kill()
        producer.close()
        c.close()
        proxy.close()
    assert "milvus unavailable" in log.read_text()


class Publisher:
    """Project events to the topic, and the state they leave: {project_id: image path}."""

    def __init__(self, settings, live: dict[int, str]):
        self.producer, self.live, self.sent = Producer(settings), dict(live), 0
        self.images = settings.data_dir / "images"

    def send(self, events) -> None:
        self.producer.projects_(events)
        self.producer.flush()
        self.sent += len(events)

    def publish(self, ids, seed: int = 0) -> None:
        paths = {p: make_image(self.images / f"{p}-{seed}.png", p + seed) for p in ids}
        self.send([event("published" if p not in self.live else "updated", p, path)
                   for p, path in paths.items()])
        self.live.update(paths)

    def delete(self, ids) -> None:
        self.send([event("deleted", p, "/gone.png") for p in ids])
        for p in ids:
            self.live.pop(p, None)


def settled(check) -> bool:
    """`check()`, or False while Milvus is still loading collections after its restart."""
    try:
        return check()
    except MilvusException:
        return False


def vectors_match(c, settings, version: int, live: dict[int, str]) -> bool:
    target = alias_target(c, settings, contract.PROJECTS)
    found = rows(c, target)
    if set(found) != set(live):
        return False
    want = expected_vectors(settings, version, list(live.values()))
    return all(float(np.dot(found[p]["embedding"], vector)) > 0.999
               for p, vector in zip(live, want, strict=True))


def test_milvus_restart_while_streaming_loses_nothing(esettings, db_url, tmp_path,
                                                      milvus_restart):
    ensure_topics(esettings)
    events = Publisher(esettings, seed_projects(esettings, db_url, 20))
    version = make_cnn(esettings, db_url, seed=1)
    log, group = tmp_path / "embed.log", esettings.embed_group
    alias = contract.alias(esettings, contract.PROJECTS)
    proc, c = start_embed(esettings, log), client(esettings)
    ingest = start_ingest(esettings, tmp_path / "ingest.log")
    try:
        wait_until(lambda: alias_target(c, esettings, contract.PROJECTS) is not None, 90,
                   "backfill")
        events.publish(range(100, 110))
        events.publish([1], seed=1)
        events.delete([2])
        wait_until(lambda: visible(c, alias, [*range(100, 110), 1, 2]) == set(range(100, 110))
                   | {1}, 15, "the stream running")
        wait_until(lambda: stored_offsets(db_url, group) == events.sent, 10, "offsets")
        c.close()  # its channel would not survive the restart

        with milvus_restart():
            events.publish(range(200, 210))
            events.publish([3, 101], seed=2)
            events.delete([4, 100])
            for _ in range(10):  # nothing acknowledged, nothing stored
                assert stored_offsets(db_url, group) == events.sent - 14
                time.sleep(0.2)
            assert proc.poll() is None

        c = client(esettings)
        events.publish(range(300, 310))
        wait_until(lambda: stored_offsets(db_url, group) == events.sent, 60,
                   "every event acknowledged after the restart")
        wait_until(lambda: settled(lambda: vectors_match(c, esettings, version, events.live)),
                   60, "every live project with its latest vector, deleted ones gone")
        assert proc.poll() is None  # rode it out, no crash and restart
    finally:
        events.producer.close()
        c.close()
        ingest.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        ingest.wait(30)
    assert code == 0
    text = log.read_text()
    assert "milvus unavailable" in text and "milvus back after" in text
