"""A Postgres outage longer than max.poll.interval.ms, cut by a TCP proxy in front of the
machine's server: ingest stays in its group (partitions paused, polling on), says it is not
ready, and stores every event exactly once when the database is back; a rebalance during
the outage does not wait on the database."""

from __future__ import annotations

import signal
import time

from pydantic import SecretStr

from tests.conftest import free_port
from tests.helpers import count, interaction, probe, start_ingest, stored, wait_until
from tests.proxy import Proxy, via

N = 6_000
MAX_POLL_MS = 3_000  # the outage below lasts three times as long


def assigned(log) -> int:
    return log.read_text().count(" assigned ")


def test_database_outage_keeps_the_group_and_loses_nothing(settings, producer, db_url,
                                                           tmp_path):
    proxy = Proxy(int(db_url.rsplit(":", 1)[1].split("/")[0]))
    cut_off = settings.model_copy(update={"database_url": SecretStr(via(db_url, proxy))})
    port, log = free_port(), tmp_path / "a.log"
    env = {"COFEAT_KAFKA_MAX_POLL_INTERVAL_MS": str(MAX_POLL_MS),
           "COFEAT_INGEST_MAX_RECORDS": "500", "COFEAT_INGEST_RETRY_MAX_S": "1"}
    first = start_ingest(cut_off, log, COFEAT_METRICS_PORT=str(port), **env)
    second = None
    try:
        producer.interactions_(interaction(n, user=n % 400) for n in range(N // 3))
        producer.flush()
        wait_until(lambda: stored(db_url) >= N // 3, 60, "the first third")
        wait_until(lambda: probe(port, "/readyz")[0] == 200, 10, "ready")
        assert assigned(log) == 1

        # 1. Three times max.poll.interval.ms without a database: still a member, not ready.
        proxy.cut()
        producer.interactions_(interaction(n, user=n % 400) for n in range(N // 3, 2 * N // 3))
        producer.flush()
        time.sleep(3 * MAX_POLL_MS / 1000)
        assert first.poll() is None, "the service must not exit while the database is down"
        status, detail = probe(port, "/readyz")
        assert status == 503 and "database unavailable" in detail, detail
        assert probe(port, "/healthz")[0] == 200  # alive: a restart would not help
        assert stored(db_url) == N // 3
        proxy.restore()
        wait_until(lambda: stored(db_url) >= 2 * N // 3, 60, "the second third")
        wait_until(lambda: probe(port, "/readyz")[0] == 200, 10, "ready again")
        assert assigned(log) == 1, "evicted or rebalanced during the outage"
        assert "revoked" not in log.read_text()

        # 2. A rebalance during an outage: the new member's arrival must not wait for the
        # first one's database (its callbacks ask once, then its partitions wait, paused).
        proxy.cut()
        second = start_ingest(settings, tmp_path / "b.log", **env)  # straight to Postgres
        wait_until(lambda: assigned(tmp_path / "b.log") >= 1, 60, "the second member joined")
        producer.interactions_(interaction(n, user=n % 400) for n in range(2 * N // 3, N))
        producer.flush()
        time.sleep(2)
        assert first.poll() is None
        proxy.restore()
        wait_until(lambda: stored(db_url) >= N, 90, "every event")
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in (first, second) if proc is not None]
        proxy.close()
    assert codes == [0, 0]
    assert stored(db_url) == N
    assert count(db_url, "SELECT count(DISTINCT event_id) FROM interactions") == N
    assert count(db_url, "SELECT sum(next_offset) FROM consumer_offsets") == N
    text = log.read_text()
    assert "database unavailable" in text and "database back after" in text
    assert "wait, paused, for their stored offsets" in text
