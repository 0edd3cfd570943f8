"""Helpers for embedder tests: tiny CNN and factor versions, images, projects, Milvus."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch
from PIL import Image
from pymilvus import MilvusClient

from shared import milvus as contract
from shared import topics
from shared.artifacts import version_dir, write_json
from shared.events import ProjectEvent, project_key, project_value
from shared.factors import Factors, write_factors
from shared.milvus import drop_prefixed as drop_milvus_prefix
from shared.settings import Settings
from shared.vision import ModelConfig, build_model, embed_images, save_model
from tests.helpers import cofeat, settings_env, start

DIM = 8
NOW_MS = lambda: int(time.time() * 1000)  # noqa: E731


@pytest.fixture
def esettings(settings, milvus_uri) -> Settings:
    """The suite's settings plus a private Milvus prefix and fast embedder timings."""
    own = settings.model_copy(update={
        "milvus_uri": milvus_uri, "milvus_prefix": f"t{uuid.uuid4().hex[:8]}_",
        "milvus_timeout_s": 3.0, "embed_drop_grace_s": 0.0, "embed_model_poll_s": 0.5,
        "embed_max_attempts": 2, "embed_retry_interval_s": 0.5, "embed_retry_max_s": 1.0,
        "embed_workers": 0, "embed_backfill_chunk": 16, "embed_batch_size": 16,
        "milvus_hnsw_ef_construction": 32})
    yield own
    drop_prefixed(own)


def drop_prefixed(settings: Settings) -> None:
    client = MilvusClient(uri=settings.milvus_uri, dedicated=True)
    try:
        drop_milvus_prefix(client, settings.milvus_prefix)
    finally:
        client.close()


def env(settings: Settings, **extra: str) -> dict[str, str]:
    names = ("milvus_uri", "milvus_prefix", "milvus_timeout_s", "embed_drop_grace_s",
             "embed_model_poll_s", "embed_max_attempts", "embed_retry_interval_s",
             "embed_retry_max_s", "embed_workers", "embed_backfill_chunk", "embed_batch_size",
             "milvus_hnsw_ef_construction")
    values = {f"COFEAT_{n.upper()}": str(getattr(settings, n)) for n in names}
    return settings_env(settings, **(values | extra))


def start_embed(settings: Settings, log: Path, *args: str, **extra) -> subprocess.Popen:
    return start(cofeat("embed", *args), env(settings, **extra), log)


def start_ingest(settings: Settings, log: Path, **extra) -> subprocess.Popen:
    """Ingest beside the embedder, as deployed: the embedder applies only what the store
    holds, so events it reads wait until ingest has stored them."""
    return start(cofeat("ingest"), env(settings, **extra), log)


# -- model and factor versions ------------------------------------------------------------


def _insert_version(db_url: str, kind: str, factor_version_id: int | None = None) -> int:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "INSERT INTO model_versions (kind, factor_version_id, status) "
            "VALUES (%s, %s, 'candidate') RETURNING id", (kind, factor_version_id)).fetchone()[0]


def promote(db_url: str, version_id: int) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE model_versions SET status = 'promoted' WHERE id = %s",
                     (version_id,))


def make_factors(settings: Settings, db_url: str, user_ids, k: int = DIM, seed: int = 0) -> int:
    version = _insert_version(db_url, "factors")
    rng = np.random.default_rng(seed)
    directory = version_dir(settings.data_dir, "factors", version)
    directory.mkdir(parents=True)
    user_ids = np.asarray(sorted(user_ids), dtype=np.int64)
    write_factors(directory, Factors(
        user_factors=rng.normal(size=(len(user_ids), k)).astype(np.float32),
        item_factors=np.zeros((0, k), np.float32), user_ids=user_ids,
        item_ids=np.zeros(0, np.int64), meta={"version": version}))
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE model_versions SET status = 'promoted', artifact = %s WHERE id = %s",
                     (f"models/factors/v{version}", version))
    return version


def make_cnn(settings: Settings, db_url: str, feature: str = "head", seed: int = 0,
             factor_version: int | None = None, promoted: bool = True) -> int:
    """A random-init small CNN saved as a CNN version (the embedder only needs the file)."""
    version = _insert_version(db_url, "cnn", factor_version)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone="small", out_dim=DIM, image_size=64,
                                    feature=feature)).eval()
    directory = version_dir(settings.data_dir, "cnn", version)
    save_model(directory / "model.pt", model)
    write_json(directory / "meta.json", {"version": version, "factor_version": factor_version})
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE model_versions SET artifact = %s WHERE id = %s",
                     (f"models/cnn/v{version}", version))
    if promoted:
        promote(db_url, version)
    return version


def expected_vectors(settings: Settings, version: int, paths: list[str]) -> np.ndarray:
    from shared.vision import load_model

    model, _ = load_model(version_dir(settings.data_dir, "cnn", version) / "model.pt", "cpu")
    return embed_images(model, paths, batch_size=16, device="cpu")


# -- images and projects ------------------------------------------------------------------


def make_image(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(base).resize((64, 64), Image.Resampling.NEAREST).save(path)
    return str(path)


def make_corrupt(path: Path) -> str:
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return str(path)


def insert_projects(db_url: str, rows: list[tuple[int, int, str]], ts_ms: int = None) -> None:
    """(project_id, owner_id, image path) rows as live projects, as ingest would store them."""
    ts_ms = ts_ms or NOW_MS() - 60_000
    with psycopg.connect(db_url) as conn:
        for project_id, owner_id, uri in rows:
            conn.execute(
                "INSERT INTO projects (project_id, owner_id, image_uri, status, published_at, "
                "updated_at, last_event_id) VALUES (%s, %s, %s, 'live', to_timestamp(%s / "
                "1000.0), to_timestamp(%s / 1000.0), %s)",
                (project_id, owner_id, uri, ts_ms, ts_ms, f"seed-{project_id}"))


def seed_projects(settings: Settings, db_url: str, n: int, start: int = 1) -> dict[int, str]:
    images = settings.data_dir / "images"
    images.mkdir(exist_ok=True)
    paths = {pid: make_image(images / f"{pid}.png", pid) for pid in range(start, start + n)}
    insert_projects(db_url, [(pid, 100 + pid % 7, path) for pid, path in paths.items()])
    return paths


# -- Milvus reads -------------------------------------------------------------------------


def client(settings: Settings) -> MilvusClient:
    return MilvusClient(uri=settings.milvus_uri, dedicated=True)


def alias_target(c: MilvusClient, settings: Settings, kind: str) -> str | None:
    name = contract.alias(settings, kind)
    if name not in c.list_aliases()["aliases"]:
        return None
    return c.describe_alias(name)["collection_name"]


def rows(c: MilvusClient, name: str, ids=None, consistency: str = "Strong") -> dict[int, dict]:
    flt = f"project_id in {list(ids)}" if ids is not None else "project_id >= 0"
    found = c.query(name, filter=flt, output_fields=["project_id", "embedding",
                                                     "model_version", "owner_id",
                                                     "published_at"],
                    consistency_level=consistency, limit=16384)
    return {r["project_id"]: r for r in found}


def failures(db_url: str) -> dict[int, tuple]:
    with psycopg.connect(db_url) as conn:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT project_id, attempts, reason FROM embed_failures").fetchall()}


# -- the stream, with ingest's store function in process ----------------------------------


class Platform:
    """Project events as the embedder sees them: produced to the real topic, and stored by
    the store function ingest uses (`write_batch`, with ingest's offsets) only when a test
    says so, so the test decides exactly how far ingest lags."""

    def __init__(self, settings: Settings, db_url: str):
        from kafka import KafkaProducer

        from shared.kafka.config import producer_config

        self.settings, self.db_url = settings, db_url
        self.producer = KafkaProducer(**producer_config(settings, linger_ms=0))
        self.topic = topics.projects(settings.topic_prefix)
        self.unstored: list[tuple[ProjectEvent, int, int]] = []  # (event, partition, offset)
        self.sent_to: dict[tuple[str, int], int] = {}  # next offset per partition

    def send(self, *events: ProjectEvent) -> None:
        for event in events:
            meta = self.producer.send(self.topic, key=project_key(event),
                                      value=project_value(event)).get(30)
            self.unstored.append((event, meta.partition, meta.offset))
            self.sent_to[(self.topic, meta.partition)] = meta.offset + 1

    def ingest(self, count: int | None = None) -> None:
        """Store the oldest `count` unstored events (all: None), in order, as ingest would."""
        from shared.db.store import write_batch

        count = len(self.unstored) if count is None else count
        batch, self.unstored = self.unstored[:count], self.unstored[count:]
        if not batch:
            return
        offsets: dict[tuple[str, int], int] = {}
        for _, partition, offset in batch:
            key = (self.topic, partition)
            offsets[key] = max(offsets.get(key, 0), offset + 1)
        with psycopg.connect(self.db_url) as conn:
            write_batch(conn, [], [event for event, _, _ in batch], self.settings.ingest_group,
                        offsets)

    def close(self) -> None:
        self.producer.close(10)


def live_ids(db_url: str) -> dict[int, int]:
    """{project_id: state_version} Postgres wants in the collection."""
    with psycopg.connect(db_url) as conn:
        return dict(conn.execute(
            "SELECT p.project_id, p.state_version FROM projects p WHERE p.status = 'live' "
            "AND NOT EXISTS (SELECT 1 FROM embed_failures f WHERE f.project_id = p.project_id "
            "AND f.state_version = p.state_version)").fetchall())


def held(c: MilvusClient, name: str) -> dict[int, int]:
    """{project_id: state_version} the collection (or alias) holds, read Strong."""
    found = c.query(name, filter="project_id >= 0", output_fields=["state_version"],
                    consistency_level="Strong", limit=16384)
    return {r["project_id"]: r["state_version"] for r in found}


def settle(embedder, platform: Platform | None = None, timeout_s: float = 90.0,
           until=None) -> None:
    """Turn the in-process embedder until it has read everything `platform` sent, is caught
    up, has no backfill and serves a model (or until `until()` holds)."""
    deadline = time.monotonic() + timeout_s

    def read_all() -> bool:
        if platform is None:
            return True
        if embedder.stream is None or not embedder.stream.source.joined:
            return False
        return all(embedder.stream.source.position(*tp) >= offset
                   for tp, offset in platform.sent_to.items())

    done = until or (lambda: (embedder.lifecycle.backfill is None
                              and embedder.lifecycle.live is not None
                              and read_all() and embedder.caught_up()))
    while not done():
        assert time.monotonic() < deadline, "the embedder did not settle"
        embedder.turn()
