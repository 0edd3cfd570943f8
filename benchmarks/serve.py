"""Serving benchmark: embedder throughput and freshness (this file), query latency
(benchmarks/query.py's `run`, with --query).

Embed: N generated images as live projects, a random-init CNN version, then
`cofeat embed --drain`: model images/s (what the embedder logs and exports) and the whole
backfill (embed + insert + index + load + count check + alias swap) in rows/s.
Freshness: `cofeat embed` as a service, `cofeat ingest` beside it (the embedder writes what
the store holds); M `published` events one at a time, each timed from its produce call to
the first query through the alias (default Bounded consistency) that finds it: p50/p99 of
event -> searchable, ingest's batch included.
Freshness during a backfill (--backfill): the service running on the N projects, a new CNN
version is promoted, and `published` events arrive at a steady rate (--rate per second)
until its backfill has swapped the alias; each is timed as above, and only those produced
before the swap count. --train-load runs a stand-in for CNN training (a small CNN training
on random images with torch's default threads) meanwhile, as `cofeat run` does.

Uses the configured servers (COFEAT_DATABASE_URL as an admin connection, COFEAT_KAFKA_BOOTSTRAP,
COFEAT_MILVUS_URI, or the running `cofeat dev up` stack) with a fresh database, topic prefix
and Milvus prefix, all removed afterwards.

    python -m benchmarks.serve [--images 2000] [--events 50] [--backbone small] [--query]
                               [--backfill [--rate 5] [--train-load] [--embed-threads N]]
                               [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
from PIL import Image
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from benchmarks.machine import describe
from shared import milvus
from shared.artifacts import version_dir, write_json
from shared.db.connect import conninfo
from shared.db.engine import make_engine, upgrade
from shared.events import ProjectEvent, project_key, project_value
from shared.kafka.admin import ensure_topics
from shared.milvus import drop_prefixed
from shared.settings import Settings, load_settings

GOAL_FRESHNESS_P99_S = 5.0
WARMUP_IDS = itertools.count(9_000_000)


# -- fixtures of one run --------------------------------------------------------------------


def write_images(directory: Path, count: int, size: int = 64, seed: int = 0) -> list[str]:
    """Blocky random PNGs: cheap to make, real files to decode."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        block = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        path = directory / f"{i}.png"
        Image.fromarray(block).resize((size, size), Image.Resampling.NEAREST).save(path)
        paths.append(str(path))
    return paths


def add_projects(settings: Settings, paths: list[str], first_id: int = 1) -> None:
    with psycopg.connect(conninfo(settings.require_database_url())) as conn, \
            conn.cursor().copy("COPY projects (project_id, owner_id, image_uri, status, "
                               "published_at, updated_at, last_event_id) FROM STDIN") as copy:
        for n, path in enumerate(paths):
            pid = first_id + n
            copy.write_row((pid, pid % 97, path, "live", "2026-01-01T00:00:00Z",
                            "2026-01-01T00:00:00Z", f"bench-{pid}"))


def add_cnn(settings: Settings, backbone: str, out_dim: int = 32, image_size: int = 64) -> int:
    from shared.vision import ModelConfig, build_model, save_model

    with psycopg.connect(conninfo(settings.require_database_url())) as conn:
        version = conn.execute("INSERT INTO model_versions (kind, status) VALUES ('cnn', "
                               "'candidate') RETURNING id").fetchone()[0]
        model = build_model(ModelConfig(backbone=backbone, out_dim=out_dim,
                                        image_size=image_size))
        directory = version_dir(settings.data_dir, "cnn", version)
        save_model(directory / "model.pt", model)
        write_json(directory / "meta.json", {"version": version})
        conn.execute("UPDATE model_versions SET status = 'promoted', artifact = %s "
                     "WHERE id = %s", (f"models/cnn/v{version}", version))
    return version


def embed_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COFEAT_")}
    return env | {
        "COFEAT_DATABASE_URL": settings.require_database_url(),
        "COFEAT_KAFKA_BOOTSTRAP": settings.require_kafka_bootstrap(),
        "COFEAT_MILVUS_URI": settings.require_milvus_uri(),
        "COFEAT_TOPIC_PREFIX": settings.topic_prefix,
        "COFEAT_MILVUS_PREFIX": settings.milvus_prefix, "COFEAT_EMBED_GROUP": settings.embed_group,
        "COFEAT_DATA_DIR": str(settings.data_dir), "COFEAT_LOG_FORMAT": "text",
        "COFEAT_KAFKA_SESSION_TIMEOUT_MS": "6000", "COFEAT_KAFKA_HEARTBEAT_INTERVAL_MS": "2000",
        "OMP_WAIT_POLICY": "PASSIVE"}


# -- the two measurements -------------------------------------------------------------------


def embed_throughput(settings: Settings, images: int, backbone: str = "small") -> dict:
    """Backfill `images` projects with `cofeat embed --drain`; images/s and rows/s."""
    paths = write_images(settings.data_dir / "images", images)
    add_projects(settings, paths)
    add_cnn(settings, backbone)
    log = settings.data_dir / "embed-drain.log"
    started = time.perf_counter()
    with log.open("wb") as out:
        code = subprocess.call([sys.executable, "-m", "services", "embed", "--drain"],
                               env=embed_env(settings), stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    text = log.read_text()
    match = re.search(r"backfill of v\d+ done in ([\d.]+) s: (\d+) images at (\d+) images/s"
                      r".*filling ([\d.]+) s, index \+ load \+ check ([\d.]+) s", text)
    if code != 0 or match is None:
        raise RuntimeError(f"cofeat embed --drain failed ({code}); see {log}")
    backfill_s, rows, rate = float(match[1]), int(match[2]), float(match[3])
    return {"images": rows, "backbone": backbone, "model_images_per_s": rate,
            "backfill_s": backfill_s, "backfill_rows_per_s": rows / backfill_s,
            "fill_s": float(match[4]), "index_load_s": float(match[5]),
            "process_wall_s": wall}


def event_to_searchable(settings: Settings, events: int, gap_s: float = 0.2) -> dict:
    """Latency from producing a `published` event to a query through the alias finding it."""
    paths = write_images(settings.data_dir / "images" / "fresh", events, seed=1)
    with embed_service(settings, "embed-service.log") as live:
        latencies = []
        for n, path in enumerate(paths):
            time.sleep(gap_s)  # one event at a time: latency, not a backlog
            latencies.append(_one_event(live, 10_000_000 + n, path))
    return summary(latencies) | {"events": events}


def freshness_during_backfill(settings: Settings, backbone: str, rate: float,
                              train_load: bool, threads: int = 0) -> dict:
    """Event -> searchable for a steady `rate` of new projects while a new CNN version's
    backfill re-embeds every stored project (the demo's situation after each promotion).
    `threads`: the embedder's COFEAT_EMBED_TORCH_THREADS."""
    # A short model poll: the backfill starts right after the promotion, not up to 10 s on.
    env = {"COFEAT_EMBED_MODEL_POLL_S": "1", "COFEAT_EMBED_TORCH_THREADS": str(threads)}
    with embed_service(settings, "embed-backfill.log", **env) as live, \
            stand_in_training(train_load):
        version = add_cnn(settings, backbone)
        result = _trickle(settings, live, rate,
                          milvus.collection_name(settings, milvus.PROJECTS, version))
    text = (settings.data_dir / "embed-backfill.log").read_text()
    match = re.search(rf"backfill of v{version} done in ([\d.]+) s", text)
    slow = re.findall(r"slow loop step: (\w+) took ([\d.]+) s", text)
    return result | {"backfill_s": float(match[1]) if match else None,
                     "slow_steps": [(part, float(s)) for part, s in slow]}


def _trickle(settings: Settings, live: Live, rate: float, target: str) -> dict:
    """Publish `rate` events/s until the alias is on `target`; wait for every one."""
    paths = write_images(settings.data_dir / "images" / "trickle", 100, seed=3)
    pending: dict[int, float] = {}  # project_id -> produced at
    latencies, swapped, n = [], False, 0
    next_event = next_alias_check = time.perf_counter()
    deadline = time.monotonic() + 1800
    while not swapped or pending:
        now = time.perf_counter()
        if not swapped and now >= next_event:
            pending[30_000_000 + n] = _send(live, 30_000_000 + n, paths[n % len(paths)])
            n, next_event = n + 1, next_event + 1 / rate
        if pending:
            found = live.client.query(live.alias, filter=f"project_id in {list(pending)}",
                                      output_fields=["project_id"])
            for row in found:
                latencies.append(time.perf_counter() - pending.pop(row["project_id"]))
        if not swapped and now >= next_alias_check:
            swapped = live.client.describe_alias(live.alias)["collection_name"] == target
            next_alias_check = now + 0.25
        if time.monotonic() > deadline:
            raise RuntimeError(f"backfill not swapped or {len(pending)} events not searchable")
        time.sleep(0.01)
    return summary(latencies) | {"events": n, "load": os.getloadavg()}


def summary(latencies: list[float]) -> dict:
    values = np.array(latencies)
    return {"p50_s": float(np.percentile(values, 50)), "p99_s": float(np.percentile(values, 99)),
            "max_s": float(values.max())}


@dataclass
class Live:
    """A running `cofeat embed` and what a benchmark talks to it through."""

    client: object
    producer: object
    topic: str
    alias: str


@contextlib.contextmanager
def embed_service(settings: Settings, log_name: str, **env: str) -> Iterator[Live]:
    from kafka import KafkaProducer

    from shared.kafka.config import producer_config
    from shared.topics import projects

    proc = subprocess.Popen([sys.executable, "-m", "services", "embed"],
                            env=embed_env(settings) | env,
                            stdout=(settings.data_dir / log_name).open("wb"),
                            stderr=subprocess.STDOUT)
    # Ingest beside it, as deployed: the embedder writes a project once the store has it,
    # so event -> searchable includes ingest's batch.
    ingest = subprocess.Popen([sys.executable, "-m", "services", "ingest"],
                              env=embed_env(settings) | env,
                              stdout=(settings.data_dir / f"ingest-{log_name}").open("wb"),
                              stderr=subprocess.STDOUT)
    live = Live(milvus.connect(settings), KafkaProducer(**producer_config(settings, linger_ms=0)),
                projects(settings.topic_prefix), milvus.alias(settings, milvus.PROJECTS))
    try:
        _wait_ready(settings, live, proc)
        yield live
    finally:
        for running in (proc, ingest):
            running.terminate()
        for running in (proc, ingest):
            running.wait(30)
        live.producer.close()
        live.client.close()


def _send(live: Live, project_id: int, path: str) -> float:
    """Produces a `published` event; returns when (perf_counter) it was acknowledged."""
    event = ProjectEvent(f"bench-{project_id}", "published", project_id, 1, path,
                         int(time.time() * 1000))
    started = time.perf_counter()
    live.producer.send(live.topic, key=project_key(event), value=project_value(event))
    live.producer.flush()
    return started


def _one_event(live: Live, project_id: int, path: str) -> float:
    started = _send(live, project_id, path)
    deadline = started + 60
    while time.perf_counter() < deadline:
        if live.client.query(live.alias, filter=f"project_id == {project_id}",
                             output_fields=["model_version"]):
            return time.perf_counter() - started
        time.sleep(0.01)
    raise RuntimeError(f"project {project_id} not searchable after 60 s")


def _wait_ready(settings: Settings, live: Live, proc: subprocess.Popen) -> None:
    """Until the service has its collection and has joined its group (a warm-up event)."""
    path = write_images(settings.data_dir / "images" / "warmup", 1, seed=2)[0]
    deadline = time.monotonic() + 300
    while live.alias not in live.client.list_aliases()["aliases"]:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("cofeat embed did not come up")
        time.sleep(0.2)
    _one_event(live, next(WARMUP_IDS), path)  # a new id: found only once the stream runs


@contextlib.contextmanager
def stand_in_training(enabled: bool) -> Iterator[None]:
    """CNN training's CPU use, in a process of its own, while the block runs."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c",
                             "from benchmarks.serve import train_forever; train_forever()"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)  # torch's import and the first steps
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def train_forever(image_size: int = 64) -> None:
    """The small backbone training on random 64 px images, batch 64, torch's threads."""
    import torch

    from shared.vision import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="small", out_dim=32, image_size=image_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, target = torch.rand(64, 3, image_size, image_size), torch.rand(64, 32)
    while True:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(images), target).backward()
        optimizer.step()


# -- the run --------------------------------------------------------------------------------


def fresh_settings(base: Settings, data_dir: Path) -> tuple[Settings, str, str]:
    admin = conninfo(base.require_database_url())
    database = f"cofeat_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = make_url(admin).set(database=database).render_as_string(hide_password=False)
    settings = base.model_copy(update={
        "database_url": SecretStr(url), "kafka_bootstrap": base.require_kafka_bootstrap(),
        "milvus_uri": base.require_milvus_uri(), "data_dir": data_dir,
        "topic_prefix": f"bench{uuid.uuid4().hex[:6]}.",
        "milvus_prefix": f"bench{uuid.uuid4().hex[:6]}_",
        # A group of its own: a member a previous run left behind cannot stall the join.
        "embed_group": f"bench-embed-{uuid.uuid4().hex[:6]}"})
    upgrade(make_engine(settings), settings)
    ensure_topics(settings)
    return settings, admin, database


def cleanup(settings: Settings, admin: str, database: str) -> None:
    client = milvus.connect(settings)
    drop_prefixed(client, settings.milvus_prefix)
    client.close()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def run_embed(base: Settings, images: int, events: int, backbone: str,
              logs: Path | None = None, backfill: dict | None = None) -> dict:
    """`backfill`: {"rate": events/s, "train_load": bool, "threads": embedder torch threads}
    to measure freshness during one."""
    with tempfile.TemporaryDirectory(prefix="cofeat-bench-serve-") as tmp:
        settings, admin, database = fresh_settings(base, Path(tmp))
        try:
            result = embed_throughput(settings, images, backbone)
            print(f"embed: {result['images']:,} images ({backbone}), model "
                  f"{result['model_images_per_s']:,.0f} images/s; backfill "
                  f"{result['backfill_s']:.1f} s = {result['backfill_rows_per_s']:,.0f} rows/s "
                  f"(filling {result['fill_s']:.1f} s = "
                  f"{result['images'] / result['fill_s']:,.0f} rows/s, then index + load + "
                  f"check + swap {result['index_load_s']:.1f} s); process "
                  f"{result['process_wall_s']:.1f} s with start-up", flush=True)
            fresh = event_to_searchable(settings, events)
            print(f"event -> searchable ({events} events, one at a time): p50 "
                  f"{fresh['p50_s'] * 1000:.0f} ms, p99 {fresh['p99_s'] * 1000:.0f} ms, max "
                  f"{fresh['max_s'] * 1000:.0f} ms (goal p99 < {GOAL_FRESHNESS_P99_S:.0f} s)",
                  flush=True)
            during = None
            if backfill is not None:
                during = freshness_during_backfill(settings, backbone, **backfill)
                print_during_backfill(during, images, **backfill)
            return {"embed": result, "freshness": fresh, "during_backfill": during}
        finally:
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).glob("embed-*.log"):
                    shutil.copy(log, logs / log.name)
            cleanup(settings, admin, database)


def print_during_backfill(during: dict, images: int, rate: float, train_load: bool,
                         threads: int) -> None:
    load = ", ".join(f"{x:.2f}" for x in during["load"])
    backfill = f"{during['backfill_s']:.1f} s" if during["backfill_s"] else "?"
    print(f"event -> searchable during a backfill of {images:,} projects ({backfill}; "
          f"{during['events']} events at {rate:g}/s{', stand-in training' if train_load else ''}"
          f", embedder torch threads {threads or 'default'}): p50 "
          f"{during['p50_s'] * 1000:.0f} ms, p99 {during['p99_s'] * 1000:.0f} ms, max "
          f"{during['max_s'] * 1000:.0f} ms; load average {load}", flush=True)
    if during["slow_steps"]:
        print(f"  slow embedder loop steps: {during['slow_steps']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--backbone", default="small", choices=["small", "resnet18"])
    parser.add_argument("--logs", type=Path, help="copy the embedder's logs here")
    parser.add_argument("--query", action="store_true",
                        help="also run benchmarks/query.py's query half")
    parser.add_argument("--backfill", action="store_true",
                        help="also measure freshness while a new CNN version is backfilled")
    parser.add_argument("--rate", type=float, default=5.0,
                        help="new projects per second during the backfill")
    parser.add_argument("--train-load", action="store_true",
                        help="a stand-in CNN training runs during the backfill")
    parser.add_argument("--embed-threads", type=int, default=0,
                        help="COFEAT_EMBED_TORCH_THREADS for the backfill (0: torch's default)")
    args = parser.parse_args()
    base = load_settings()
    print(f"machine: {describe()}")
    backfill = ({"rate": args.rate, "train_load": args.train_load,
                 "threads": args.embed_threads} if args.backfill else None)
    run_embed(base, args.images, args.events, args.backbone, args.logs, backfill)
    if args.query:
        from benchmarks import query

        query.run(base, [100_000], http=False)


if __name__ == "__main__":
    main()
