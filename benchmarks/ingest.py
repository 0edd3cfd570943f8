"""Ingest throughput: preload N events, run `cofeat ingest --drain`, report events/s, and
in the same run the bare kafka-python consumer on the same topic, and their ratio.

Both are timed as whole processes, start and group join included (Tansu holds a join for
about half the session timeout, 6 s here). `--rounds` alternates them, so a busy machine
slows both alike; the ratio is the figure to compare between machines.

Uses the configured servers (COFEAT_* or the running `cofeat dev up` stack) but a fresh
database and its own topic prefix, both removed afterwards.

    python -m benchmarks.ingest [--events 1000000] [--consumers 1] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
import uuid

import psycopg
from kafka import KafkaProducer
from sqlalchemy.engine import make_url

from benchmarks.machine import describe
from shared import topics
from shared.db.connect import conninfo
from shared.db.engine import make_engine, upgrade
from shared.events import Interaction, InteractionType, interaction_value
from shared.kafka.admin import ensure_topics
from shared.kafka.config import producer_config
from shared.settings import load_settings

T0 = 1_750_000_000_000


def _produce(args: tuple) -> int:
    settings, start, stop = args
    producer = KafkaProducer(**producer_config(settings, linger_ms=50, batch_size=512 * 1024,
                                               compression_type="lz4"))
    topic = topics.interactions(settings.topic_prefix)
    for n in range(start, stop):
        event = Interaction(f"bench-{n}", InteractionType(n % 3), n % 50_000,
                            n * 7 % 100_000, T0 + n)
        producer.send(topic, key=str(event.user_id).encode(), value=interaction_value(event))
    producer.flush()
    producer.close()
    return stop - start


def preload(settings, events: int, workers: int = 2) -> float:
    started = time.perf_counter()
    step = -(-events // workers)
    chunks = [(settings, i, min(events, i + step)) for i in range(0, events, step)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_produce, chunks)
    return events / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1,
                        help="bare consumer and ingest alternately, this many times each")
    args = parser.parse_args()

    base = load_settings()
    admin_url = conninfo(base.require_database_url())
    database = f"cofeat_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = make_url(admin_url).set(database=database).render_as_string(hide_password=False)
    settings = load_settings(database_url=url, kafka_bootstrap=base.require_kafka_bootstrap(),
                             topic_prefix=f"bench{uuid.uuid4().hex[:6]}.",
                             kafka_partitions=args.partitions)
    try:
        upgrade(make_engine(settings), settings)
        ensure_topics(settings)
        print(f"machine: {describe()}")
        rate = preload(settings, args.events)
        print(f"preloaded {args.events:,} events at {rate:,.0f} events/s")
        for round_ in range(args.rounds):
            bare = bare_consumer(settings, round_)
            ingest = report(settings, args, round_)
            print(f"round {round_ + 1}: ingest {ingest:,.0f} events/s, bare kafka-python "
                  f"consumer {bare:,.0f} records/s: ratio {ingest / bare:.2f}; "
                  f"load average {os.getloadavg()[0]:.1f}")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def environment(settings, group: str) -> dict[str, str]:
    return {**os.environ, "COFEAT_DATABASE_URL": settings.database_url.get_secret_value(),
            "COFEAT_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "COFEAT_TOPIC_PREFIX": settings.topic_prefix, "COFEAT_LOG_FORMAT": "text",
            "COFEAT_INGEST_GROUP": group, "COFEAT_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "COFEAT_KAFKA_HEARTBEAT_INTERVAL_MS": "2000"}


def bare_consumer(settings, round_: int) -> float:
    """Records/s of the bare kafka-python consumer, timed as a whole process."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.bare_consumer"], check=True,
                         env=environment(settings, f"bench-bare-{round_}"),
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    result = json.loads(out)
    print(f"bare kafka-python consumer: {result['records']:,} records in {wall:.1f} s, "
          f"{result['cpu_s']:.1f} CPU-s: {result['records'] / wall:,.0f} records/s")
    return result["records"] / wall


def report(settings, args, round_: int = 0) -> float:
    """events/s of `cofeat ingest --drain` into an empty store, timed as whole processes."""
    with psycopg.connect(conninfo(settings.database_url.get_secret_value())) as conn:
        conn.execute("TRUNCATE interactions, consumer_offsets")
    env = environment(settings, f"bench-ingest-{round_}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "services", "ingest", "--drain"], env=env,
                              stderr=subprocess.DEVNULL) for _ in range(args.consumers)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with psycopg.connect(conninfo(settings.database_url.get_secret_value())) as conn:
        rows = conn.execute("SELECT count(*) FROM interactions").fetchone()[0]
    print(f"consumers: {args.consumers}, partitions: {args.partitions}, exit codes: {codes}")
    print(f"stored {rows:,} rows in {wall:.1f} s (including ~3 s group join): "
          f"{rows / wall:,.0f} events/s, Postgres {rows / wall:,.0f} rows/s")
    print(f"ingest CPU: {cpu:.1f} s = {cpu / (rows / 1e6):.1f} CPU-s per million events")
    return rows / wall


if __name__ == "__main__":
    main()
