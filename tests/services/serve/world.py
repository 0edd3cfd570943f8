"""A tiny vector world in the session Milvus: a projects/users collection pair behind the
aliases, with neighbours known by brute force. Each world has its own name prefix."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared import milvus
from shared.milvus import drop_prefixed
from shared.settings import Settings

DIM = 16
N_PROJECTS = 300
N_OWNERS = 30
N_USERS = 20
FIRST_PROJECT = 1000  # ids differ from row numbers, so a mix-up shows
FIRST_USER = 5000
HOUR_MS = 3_600_000


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class World:
    settings: Settings
    version: int
    projects: np.ndarray  # [N_PROJECTS, DIM], row r is project FIRST_PROJECT + r
    owners: np.ndarray
    published: np.ndarray  # epoch ms: project r went out r + 0.5 hours ago
    users: np.ndarray  # [N_USERS, DIM], row r is user FIRST_USER + r

    @property
    def project_ids(self) -> np.ndarray:
        return FIRST_PROJECT + np.arange(len(self.projects))

    def nearest(self, vector: np.ndarray, keep: np.ndarray | None = None) -> list[int]:
        """Project ids by decreasing cosine; `keep` masks which may appear."""
        scores = self.projects @ unit(np.asarray(vector, dtype=np.float32))
        order = np.argsort(-scores, kind="stable")
        if keep is not None:
            order = order[keep[order]]
        return [int(FIRST_PROJECT + r) for r in order]


def make_world(milvus_uri: str, data_dir: Path, version: int = 1, seed: int = 0,
               **settings) -> World:
    rng = np.random.default_rng(seed)
    projects = unit(rng.normal(size=(N_PROJECTS, DIM)))
    # Each user sits close to one project, so that project (then its neighbours) ranks first.
    targets = rng.choice(N_PROJECTS, N_USERS, replace=False)
    users = unit(projects[targets] + 0.1 * rng.normal(size=(N_USERS, DIM)))
    now = int(time.time() * 1000)
    published = now - (np.arange(N_PROJECTS) * HOUR_MS + HOUR_MS // 2)
    world = World(Settings(milvus_uri=milvus_uri, milvus_prefix=f"t{uuid.uuid4().hex[:8]}_",
                           data_dir=data_dir, log_format="text", **settings),
                  version, projects, np.arange(N_PROJECTS) % N_OWNERS, published, users)
    load_projects(world.settings, version, world.project_ids, projects, world.owners, published)
    load_users(world.settings, version, FIRST_USER + np.arange(N_USERS), users)
    return world


def load_projects(settings: Settings, version: int, ids, vectors, owners, published) -> str:
    rows = [{"project_id": int(i), "embedding": v.tolist(), "model_version": version,
             "owner_id": int(o), "published_at": int(p), "state_version": 0}
            for i, v, o, p in zip(ids, vectors, owners, published, strict=True)]
    return _load(settings, milvus.PROJECTS, version, milvus.project_schema(vectors.shape[1]),
                 rows)


def load_users(settings: Settings, version: int, ids, vectors) -> str:
    rows = [{"user_id": int(i), "embedding": v.tolist(), "model_version": version}
            for i, v in zip(ids, vectors, strict=True)]
    return _load(settings, milvus.USERS, version, milvus.user_schema(vectors.shape[1]), rows)


def _load(settings: Settings, kind: str, version: int, schema, rows: list[dict],
          metric: str = milvus.METRIC) -> str:
    client = milvus.connect(settings)
    name = milvus.collection_name(settings, kind, version)
    client.create_collection(name, schema=schema,
                             index_params=milvus.index_params(settings, metric))
    client.insert(name, rows)
    # One Strong read waits until the rows are searchable; later Bounded reads see them.
    client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    alias = milvus.alias(settings, kind)
    if alias in client.list_aliases()["aliases"]:
        client.alter_alias(name, alias)
    else:
        client.create_alias(name, alias)
    client.close()
    return name


def drop_world(settings: Settings) -> None:
    client = milvus.connect(settings)
    drop_prefixed(client, settings.milvus_prefix)
    client.close()
