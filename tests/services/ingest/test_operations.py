"""What operators see and rely on: metrics, health, and surviving a broker outage."""

from __future__ import annotations

import signal
import time
import urllib.request

from shared.kafka.admin import ensure_topics
from tests.conftest import free_port, start_tansu
from tests.helpers import Producer, interaction, start_ingest, stored, wait_until


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def test_metrics_and_health_endpoints(settings, producer, db_url, tmp_path):
    producer.interactions_(interaction(n) for n in range(2_000))
    producer.raw(producer.interactions, b"1", b"not json")
    producer.flush()
    port = free_port()
    proc = start_ingest(settings, tmp_path / "ingest.log", COFEAT_METRICS_PORT=str(port))
    try:
        wait_until(lambda: stored(db_url) >= 2_000, 60, "events stored")
        wait_until(lambda: 'result="invalid"' in _get(f"http://127.0.0.1:{port}/metrics")[1],
                   10, "the dead letter counted")
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        stored_line = [line for line in text.splitlines()
                       if line.startswith("cofeat_ingest_events_total")
                       and 'result="stored"' in line]
        assert float(stored_line[0].split()[-1]) == 2_000
        assert "cofeat_ingest_batch_seconds_bucket" in text
        assert "cofeat_ingest_lag{" in text
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_broker_outage_then_reconnect(settings, db_url, tmp_path):
    # A private broker this test may kill. Tansu keeps nothing across a restart, so the
    # restarted broker is empty: the service must reconnect and carry on with new events.
    port = free_port()
    broker = start_tansu(port)
    own = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})
    ensure_topics(own)
    producer = Producer(own)
    producer.interactions_(interaction(n) for n in range(1_000))
    producer.flush()
    producer.close()
    log = tmp_path / "ingest.log"
    proc = start_ingest(own, log)
    try:
        wait_until(lambda: stored(db_url) >= 1_000, 60, "events before the outage")
        broker.kill()
        broker.wait(10)
        time.sleep(3)
        assert proc.poll() is None, "the service must survive a broker outage"
        broker = start_tansu(port)
        ensure_topics(own)
        producer = Producer(own)
        producer.interactions_(interaction(n) for n in range(1_000, 1_500))
        producer.flush()
        producer.close()
        wait_until(lambda: stored(db_url) >= 1_500, 90, "events after the outage")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        broker.kill()
    assert code == 0
    assert stored(db_url) == 1_500
    text = log.read_text()
    assert "reading it from the beginning" in text
    assert text.count("ECONNREFUSED") <= 3, "outage logged once per interval, not per retry"
