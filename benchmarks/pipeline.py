"""The whole loop end to end at one simulator size, stage by stage.

    python -m benchmarks.pipeline --preset tiny|small|medium [--recipe demo|default]

simulate (images + events to files) -> produce 99% of the interactions (and the project
events up to then) -> ingest -> factor refresh (full) -> CNN (full) -> embed (backfill) ->
produce the last 1% -> ingest -> embed (stream: the new projects) -> factor refresh
(incremental) -> CNN (refresh: a fine-tune) -> queries (similar projects, projects for a
user). Every stage is its own process (`cofeat ...` as an operator would run it); the table
gives its wall time, CPU seconds, peak RSS and cost per unit, with the machine.

Servers: a scratch database on COFEAT_DATABASE_URL (dropped afterwards), a Tansu broker of
its own, the Milvus on COFEAT_MILVUS_URI (default 127.0.0.1:19530) under a prefix of its own
(dropped afterwards). `--recipe demo` uses the demo's CPU-sized CNN (small backbone, 64 px,
8 epochs; tiny: 32 px); `default` the settings' defaults (mobilenet_v2 from ImageNet,
128 px, 5 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from benchmarks.machine import describe

RECIPES = {
    "demo": {"COFEAT_CNN_BACKBONE": "small", "COFEAT_CNN_IMAGE_SIZE": "64",
             "COFEAT_CNN_EPOCHS": "8", "COFEAT_CNN_REFRESH_EPOCHS": "2"},
    "default": {},
}
TINY = {"COFEAT_CNN_IMAGE_SIZE": "32", "COFEAT_CNN_BATCH_SIZE": "32",
        "COFEAT_ALS_FACTORS": "16", "COFEAT_FILTER_MIN_USER_COUNT": "2",
        "COFEAT_FILTER_MIN_ITEM_COUNT": "2"}
SHARE = 0.99  # of the interactions produced before the first refreshes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--recipe", default="demo", choices=sorted(RECIPES))
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the data directory here (images, models)")
    sub = parser.add_subparsers(dest="internal")
    produce = sub.add_parser("produce")
    produce.add_argument("events_dir", type=Path)
    produce.add_argument("part", choices=["first", "rest"])
    query = sub.add_parser("query")
    query.add_argument("count", type=int)
    args = parser.parse_args()
    if args.internal == "produce":
        return _produce(args.events_dir, args.part)
    if args.internal == "query":
        return _query(args.count)
    return run(args)


# -- the stages run in child processes ------------------------------------------------------

def _produce(events_dir: Path, part: str) -> None:
    """Send one part of the simulated files to Kafka, keyed as the simulator keys them."""
    from services.simulate.stream import KafkaSink
    from shared import topics
    from shared.kafka.admin import ensure_topics
    from shared.settings import load_settings

    settings = load_settings()
    ensure_topics(settings)
    interactions = (events_dir / "cofeat.interactions.jsonl").read_bytes().splitlines()
    cut = int(len(interactions) * SHARE)
    cutoff = json.loads(interactions[cut - 1])["ts"] if cut else 0
    mine = interactions[:cut] if part == "first" else interactions[cut:]
    sink = KafkaSink(settings)
    sent = 0
    for line in (events_dir / "cofeat.projects.jsonl").read_bytes().splitlines():
        event = json.loads(line)
        if (event["ts"] <= cutoff) == (part == "first"):
            sink.send(topics.projects(settings.topic_prefix), str(event["project_id"]).encode(),
                      line)
            sent += 1
    topic = topics.interactions(settings.topic_prefix)
    for line in mine:
        sink.send(topic, str(json.loads(line)["user_id"]).encode(), line)
    sink.close()
    print(json.dumps({"interactions": len(mine), "project_events": sent}))


def _query(count: int) -> None:
    import numpy as np

    from shared.client import CofeatClient
    from shared.settings import load_settings

    settings = load_settings()
    client = CofeatClient.from_settings(settings)
    with psycopg.connect(settings.require_database_url()) as conn:
        projects = [r[0] for r in conn.execute(
            "SELECT project_id FROM projects WHERE status = 'live'").fetchall()]
        users = [r[0] for r in conn.execute(
            "SELECT DISTINCT user_id FROM interaction_pairs LIMIT 5000").fetchall()]
    rng = np.random.default_rng(0)
    timings = {"similar": [], "for_user": []}
    for n in range(count):
        started = time.perf_counter()
        if n % 2:
            client.similar_to_project(int(rng.choice(projects)), k=10)
            timings["similar"].append(time.perf_counter() - started)
        else:
            try:
                client.for_user(int(rng.choice(users)), k=20)
            except LookupError:  # a user the factor version filtered out
                continue
            timings["for_user"].append(time.perf_counter() - started)
    client.close()
    print(json.dumps({name: {"n": len(v), "p50_ms": 1000 * float(np.median(v)),
                             "p99_ms": 1000 * float(np.percentile(v, 99))}
                      for name, v in timings.items() if v}))


# -- the driver -----------------------------------------------------------------------------

def run(args) -> None:
    from services.dev import stack
    from shared.settings import Settings

    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    admin = os.environ.get("COFEAT_DATABASE_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
    database = f"cofeat_pipe_{uuid.uuid4().hex[:8]}"
    root = Path(tempfile.mkdtemp(prefix="cofeat-pipeline-"))
    prefix = f"pipe{uuid.uuid4().hex[:6]}_"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = make_url(admin).set(database=database).render_as_string(hide_password=False)
    kafka = stack.start_kafka(root / "kafka", _free_port())
    milvus_uri = os.environ.get("COFEAT_MILVUS_URI", "http://127.0.0.1:19530")
    env = {**os.environ, "COFEAT_DATABASE_URL": url, "COFEAT_KAFKA_BOOTSTRAP": kafka["url"],
           "COFEAT_MILVUS_URI": milvus_uri, "COFEAT_MILVUS_PREFIX": prefix,
           "COFEAT_TOPIC_PREFIX": f"{prefix}.", "COFEAT_DATA_DIR": str(root / "data"),
           "COFEAT_LOG_FORMAT": "text", "COFEAT_KAFKA_SESSION_TIMEOUT_MS": "6000",
           "COFEAT_KAFKA_HEARTBEAT_INTERVAL_MS": "2000", "OMP_WAIT_POLICY": "PASSIVE",
           **RECIPES[args.recipe], **(TINY if args.preset == "tiny" else {})}
    stages: list[dict] = []
    try:
        _stages(args, env, root, url, stages)
    finally:
        _print(stages, args)
        stack.stop_kafka(kafka)
        _drop_milvus(Settings(milvus_uri=milvus_uri, milvus_prefix=prefix), prefix)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        if args.keep:
            shutil.copytree(root / "data", args.keep, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def _stages(args, env, root: Path, url: str, stages: list[dict]) -> None:
    cofeat = [sys.executable, "-m", "services"]
    me = [sys.executable, "-m", "benchmarks.pipeline"]
    events_dir = root / "data" / "events"

    def stage(name, command, unit, count=None, **extra_env):
        result = _run(name, command, {**env, **extra_env})
        stages.append({**result, "unit": unit, "count": count(result) if count else None})
        row = stages[-1]
        print(f"  {name}: {row['wall']:.1f} s wall, {row['cpu']:.1f} CPU-s, peak RSS "
              f"{row['rss']:.2f} GiB", flush=True)
        return result

    _run("migrate", cofeat + ["migrate"], env)  # set-up, not a stage
    image_size = "32" if args.preset == "tiny" else "64"
    stage("simulate", cofeat + ["simulate", "--preset", args.preset, "--image-size",
                                image_size, "--format", "jpeg", "--out", str(events_dir)],
          "event", lambda _: _lines(events_dir / "cofeat.interactions.jsonl"),
          COFEAT_TOPIC_PREFIX="")  # plain file names; produce sends under the prefix
    first = stage("produce 99%", me + ["produce", str(events_dir), "first"], "event",
                  lambda r: json.loads(r["stdout"])["interactions"])
    stage("ingest 99%", cofeat + ["ingest", "--drain"], "event",
          lambda _: json.loads(first["stdout"])["interactions"])
    stage("factors full", cofeat + ["refresh", "factors", "--once"], "event",
          lambda _: _count(url, "SELECT count(*) FROM interactions"))
    stage("cnn full", cofeat + ["refresh", "cnn", "--once"], "project", lambda _: _count(
        url, "SELECT (stats->>'train')::int FROM model_versions WHERE kind = 'cnn' "
        "ORDER BY id DESC LIMIT 1"))
    stage("embed backfill", cofeat + ["embed", "--drain"], "project",
          lambda _: _count(url, "SELECT count(*) FROM projects WHERE status = 'live'"))
    live_before = _count(url, "SELECT count(*) FROM projects WHERE status = 'live'")
    rest = stage("produce 1%", me + ["produce", str(events_dir), "rest"], "event",
                 lambda r: json.loads(r["stdout"])["interactions"])
    stage("ingest 1%", cofeat + ["ingest", "--drain"], "event",
          lambda _: json.loads(rest["stdout"])["interactions"])
    stage("embed stream", cofeat + ["embed", "--drain"], "project event",
          lambda _: json.loads(rest["stdout"])["project_events"])
    stage("factors incremental", cofeat + ["refresh", "factors", "--once"], "new event",
          lambda _: json.loads(rest["stdout"])["interactions"])
    stage("cnn refresh", cofeat + ["refresh", "cnn", "--once"], "project", lambda _: _count(
        url, "SELECT (stats->>'train')::int FROM model_versions WHERE kind = 'cnn' "
        "ORDER BY id DESC LIMIT 1"))
    queries = stage("queries", me + ["query", str(args.queries)], "query",
                    lambda _: args.queries)
    print(f"  live projects before the 1%: {live_before:,}; factor versions: "
          f"{_versions(url)}; query latency: {queries['stdout'].strip()}", flush=True)


def _run(name: str, command: list[str], env: dict) -> dict:
    """Run one stage; wall time, and CPU and peak RSS of exactly that process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"name": name, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss": usage.ru_maxrss / 2**20, "stdout": stdout}


def _lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def _count(url: str, statement: str) -> int:
    with psycopg.connect(url) as conn:
        value = conn.execute(statement).fetchone()[0]
    return int(value or 0)


def _versions(url: str) -> str:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT kind, stats->>'mode', status FROM model_versions "
                            "ORDER BY id").fetchall()
    return ", ".join(f"{kind} {mode or ''} {status}".replace("  ", " ") for kind, mode, status
                     in rows)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _drop_milvus(settings, prefix: str) -> None:
    try:
        from shared.milvus import connect, drop_prefixed

        drop_prefixed(connect(settings), prefix)
    except Exception as error:  # the numbers are printed already; say what is left
        print(f"  could not drop Milvus collections {prefix}*: {error}")


def _print(stages: list[dict], args) -> None:
    print(f"\npreset {args.preset}, recipe {args.recipe}; each stage is one process")
    print("| stage | wall s | CPU s | peak RSS GiB | units | cost per unit |")
    print("|---|---|---|---|---|---|")
    for row in stages:
        count = row["count"]
        if count:
            per = row["wall"] / count
            cost = (f"{per * 1e6:.1f} µs per {row['unit']}" if per < 1e-3
                    else f"{per * 1e3:.2f} ms per {row['unit']}")
        else:
            cost = "–"
        units = f"{count:,}" if count is not None else "–"
        print(f"| {row['name']} | {row['wall']:.1f} | {row['cpu']:.1f} | {row['rss']:.2f} | "
              f"{units} | {cost} |")
    total = sum(row["wall"] for row in stages)
    print(f"| total | {total:.1f} | {sum(r['cpu'] for r in stages):.1f} | | | |")


if __name__ == "__main__":
    main()
