"""Test helpers: produce raw events, run `cofeat` services as real processes, wait, count."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from kafka import KafkaConsumer, KafkaProducer

from shared import topics
from shared.events import (
    Interaction,
    InteractionType,
    ProjectEvent,
    interaction_value,
    project_value,
)
from shared.kafka.config import client_config, producer_config
from shared.settings import Settings

T0 = 1_750_000_000_000


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COFEAT_")}
    env.update({
        "COFEAT_DATABASE_URL": settings.database_url.get_secret_value(),
        "COFEAT_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "COFEAT_TOPIC_PREFIX": settings.topic_prefix,
        "COFEAT_DATA_DIR": str(settings.data_dir),
        "COFEAT_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
        "COFEAT_KAFKA_HEARTBEAT_INTERVAL_MS": str(settings.kafka_heartbeat_interval_ms),
        "COFEAT_LOG_FORMAT": "text",
        "COFEAT_INGEST_RETRY_MAX_S": "1",
        "COFEAT_INGEST_GROUP": settings.ingest_group,
        "COFEAT_EMBED_GROUP": settings.embed_group,
    })
    env.update(extra)
    return env


def cofeat(*args: str) -> list[str]:
    return [sys.executable, "-m", "services", *args]


STARTED: list[subprocess.Popen] = []  # killed after each test if still running (conftest)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    STARTED.append(proc)
    return proc


def start_ingest(settings: Settings, log: Path, *args: str, **env) -> subprocess.Popen:
    return start(cofeat("ingest", *args), settings_env(settings, **env), log)


def run_ingest(settings: Settings, log: Path, *args: str, timeout: float = 120) -> int:
    proc = start_ingest(settings, log, "--drain", *args)
    try:
        return proc.wait(timeout)
    finally:
        proc.kill()


def interaction(n: int, user: int | None = None, project: int | None = None,
                kind: InteractionType = InteractionType.view) -> Interaction:
    user = n % 97 if user is None else user
    return Interaction(f"e{n}", kind, user, 1000 + n % 31 if project is None else project,
                       T0 + n)


def project(n: int, kind: str = "published", ts: int | None = None) -> ProjectEvent:
    return ProjectEvent(f"p{n}-{kind}", kind, 1000 + n, 5000 + n, f"/images/{n}.png",
                        T0 + n if ts is None else ts)


class Producer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.producer = KafkaProducer(**producer_config(settings, linger_ms=20,
                                                        batch_size=256 * 1024))
        self.interactions = topics.interactions(settings.topic_prefix)
        self.projects = topics.projects(settings.topic_prefix)

    def raw(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        self.producer.send(topic, key=key, value=value)

    def interactions_(self, events) -> None:
        for e in events:
            self.raw(self.interactions, str(e.user_id).encode(), interaction_value(e))

    def projects_(self, events) -> None:
        for e in events:
            self.raw(self.projects, str(e.project_id).encode(), project_value(e))

    def unchecked(self, topic: str, key: bytes | None, value: bytes | None,
                  headers: list | None = None, partition: int = 0) -> None:
        """What a producer in another language may put on the wire and KafkaProducer.send
        refuses (no key and no value, null header values, header keys that are no UTF-8),
        as a record batch of its own in a Produce request over the real protocol."""
        self.flush()  # keeps the order with what send() queued before
        produce_raw(self.settings, topic, partition, [(key, value, headers or [])])

    def flush(self) -> None:
        self.producer.flush(30)

    def close(self) -> None:
        self.producer.close(10)


def produce_raw(settings: Settings, topic: str, partition: int, records: list) -> None:
    """Writes (key, value, headers) records to one partition in one Produce request, acks
    from all replicas; raises on a broker error."""
    from kafka import KafkaAdminClient
    from kafka.protocol.producer import ProduceRequest
    from kafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 30)
    now = int(time.time() * 1000)
    for offset, (key, value, headers) in enumerate(records):
        builder.append(offset, now, key, value, headers)
    topic_data = ProduceRequest.TopicProduceData
    request = ProduceRequest(
        transactional_id=None, acks=-1, timeout_ms=10_000, min_version=3, max_version=9,
        topic_data=[topic_data(name=topic, partition_data=[topic_data.PartitionProduceData(
            index=partition, records=bytes(builder.build()))])])
    admin = KafkaAdminClient(**client_config(settings))
    try:
        async def send():
            return await admin._manager.send(request)

        response = admin._net.run(send)
    finally:
        admin.close()
    for answer in response.responses:
        for part in answer.partition_responses:
            assert part.error_code == 0, f"produce failed: error {part.error_code}"


class RawHeaderKey(str):
    """A header key whose bytes on the wire are `raw` (e.g. not UTF-8), for `unchecked`."""

    def __new__(cls, raw: bytes):
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, *_args, **_kwargs) -> bytes:
        return self.raw


def read_dlq(settings: Settings, topic: str, expected: int, timeout_s: float = 20) -> list:
    consumer = KafkaConsumer(topics.dlq_topic(topic), **client_config(settings),
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    records = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=1000).values():
            records.extend(batch)
    consumer.close()
    return records


def fetch_one(settings: Settings, topic: str, partition: int, offset: int) -> bytes | None:
    from kafka import TopicPartition

    consumer = KafkaConsumer(**client_config(settings))
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, offset)
    try:
        for _ in range(20):
            for record in consumer.poll(timeout_ms=500).get(tp, []):
                return record.value
        raise AssertionError(f"no record at {topic}[{partition}]@{offset}")
    finally:
        consumer.close()


def count(db_url: str, sql: str) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql).fetchone()[0]


def probe(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:<port><path>: (status, body), errors included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def stored(db_url: str) -> int:
    """Interactions stored so far; -1 while the database is unreachable."""
    try:
        return count(db_url, "SELECT count(*) FROM interactions")
    except psycopg.OperationalError:
        return -1
