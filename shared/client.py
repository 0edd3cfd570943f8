"""A thin client for cofeat's vectors in Milvus, for any service that wants similar projects.

It depends only on pymilvus and numpy, so another service can copy this file as it is.
Every query goes through the aliases `<prefix>cofeat_projects` and `<prefix>cofeat_users`
(see shared/milvus.py), which always point at one complete model version.

    client = CofeatClient("http://milvus:19530", prefix="")
    client.similar_to_project(42, k=10, exclude_owner=True)
    client.for_user(7, k=20, new_only=True)

Results are `Hit`s (use `hit.as_dict()` for JSON). An id that is not in the collection
raises `NotFound`; Milvus being down or an alias missing raises pymilvus' MilvusException.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from pymilvus import MilvusClient

# Same names as shared/milvus.py (tests/shared/test_client.py checks they agree).
PROJECTS = "cofeat_projects"
USERS = "cofeat_users"
VECTOR_FIELD = "embedding"
PROJECT_FIELDS = ["owner_id", "published_at", "model_version"]
METRIC = "COSINE"
DAY_S = 86_400


class NotFound(LookupError):
    """The project or user id has no vector in the current model version."""


@dataclass(frozen=True)
class Hit:
    project_id: int
    score: float  # cosine similarity, higher is closer
    owner_id: int
    published_at: int  # epoch ms
    model_version: int

    def as_dict(self) -> dict:
        return asdict(self)


class CofeatClient:
    def __init__(self, uri: str, token: str | None = None, prefix: str = "", *,
                 ef: int = 64, timeout_s: float = 10.0, new_window_s: float = 7 * DAY_S,
                 consistency: str = "Bounded", milvus: MilvusClient | None = None) -> None:
        # Bounded: a query may miss writes of the last few seconds but never waits for
        # them (Strong adds ~200 ms per query); the aliases switch whole versions anyway.
        # dedicated: a channel of its own, not one shared per address that another client
        # in the process may close or that may sit in gRPC's backoff after an outage.
        self.milvus = milvus or MilvusClient(uri=uri, token=token or "", timeout=timeout_s,
                                             dedicated=True)
        self.projects = prefix + PROJECTS
        self.users = prefix + USERS
        self.ef = ef
        self.timeout_s = timeout_s
        self.new_window_s = new_window_s
        self.consistency = consistency

    @classmethod
    def from_settings(cls, settings, **kwargs) -> CofeatClient:
        """From a cofeat `Settings` (duck-typed, so this file needs no cofeat import)."""
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
        options = {"ef": settings.milvus_search_ef, "timeout_s": settings.milvus_timeout_s,
                   "new_window_s": getattr(settings, "serve_new_window_s", 7 * DAY_S)}
        return cls(settings.require_milvus_uri(), token, settings.milvus_prefix,
                   **(options | kwargs))

    def close(self) -> None:
        self.milvus.close()

    # -- lookups ----------------------------------------------------------------------

    def project(self, project_id: int) -> dict:
        """The project's row: project_id, embedding (np.float32), owner_id, published_at,
        model_version."""
        return self._get(self.projects, project_id, "project")

    def user_vector(self, user_id: int) -> np.ndarray:
        return self._get(self.users, user_id, "user")[VECTOR_FIELD]

    def _get(self, collection: str, key: int, what: str) -> dict:
        rows = self.milvus.get(collection, ids=[int(key)], timeout=self.timeout_s,
                               consistency_level=self.consistency)
        if not rows:
            raise NotFound(f"{what} {key} has no vector in {collection}")
        row = dict(rows[0])
        row[VECTOR_FIELD] = np.asarray(row[VECTOR_FIELD], dtype=np.float32)
        return row

    def collection_version(self, kind: str = PROJECTS) -> int | None:
        """The model version of the collection an alias points at (from its `_v<n>` name)."""
        alias = self.projects if kind == PROJECTS else self.users
        name = self.milvus.describe_alias(alias, timeout=self.timeout_s)["collection_name"]
        head, sep, tail = name.rpartition("_v")
        return int(tail) if sep and tail.isdigit() else None

    # -- queries ----------------------------------------------------------------------

    def similar_to_project(self, project_id: int, k: int = 10,
                           exclude_owner: bool = False) -> list[Hit]:
        """Nearest projects to this one, never itself; `exclude_owner` also drops every
        project of the same owner."""
        row = self.project(project_id)
        owner = row["owner_id"] if exclude_owner else None
        return self.similar_to_vector(row[VECTOR_FIELD], k, exclude_ids=[project_id],
                                      exclude_owner_id=owner)

    def for_user(self, user_id: int, k: int = 20, new_only: bool = False,
                 new_since_ms: int | None = None) -> list[Hit]:
        """Projects whose vectors score highest against the user's; `new_only` keeps those
        published within `new_window_s` (or since `new_since_ms` when given)."""
        user = self._get(self.users, user_id, "user")
        if new_only and new_since_ms is None:
            new_since_ms = int((time.time() - self.new_window_s) * 1000)
        hits = self.similar_to_vector(user[VECTOR_FIELD], k, new_since_ms=new_since_ms)
        if hits and hits[0].model_version != user["model_version"]:
            # The users alias lags the projects one (the new model has no user vectors):
            # scores across two vector spaces would be meaningless.
            raise NotFound(f"user {user_id} has a vector of model version "
                           f"{user['model_version']}, the projects are of {hits[0].model_version}")
        return hits

    def similar_to_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10, *,
                          exclude_ids: Sequence[int] = (), exclude_owner_id: int | None = None,
                          new_since_ms: int | None = None) -> list[Hit]:
        query = _unit(vector)
        # HNSW needs ef >= k; the filter is applied inside the search, so k hits come
        # back even when it removes many neighbours.
        params = {"metric_type": METRIC, "params": {"ef": max(self.ef, k)}}
        results = self.milvus.search(
            self.projects, data=[query.tolist()], anns_field=VECTOR_FIELD, limit=k,
            filter=_filter(exclude_ids, exclude_owner_id, new_since_ms),
            output_fields=PROJECT_FIELDS, search_params=params, timeout=self.timeout_s,
            consistency_level=self.consistency)
        return [_hit(found) for found in results[0]]


def _unit(vector) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or not array.size or not np.all(np.isfinite(array)):
        raise ValueError("the query vector must be one non-empty row of finite numbers")
    norm = float(np.linalg.norm(array))
    if norm == 0.0:
        raise ValueError("the query vector is all zeros")
    return array / norm


def _filter(exclude_ids: Sequence[int], exclude_owner_id: int | None,
            new_since_ms: int | None) -> str:
    # Only ints go into the expression (int() rejects anything else): no injection.
    parts = []
    if exclude_ids:
        parts.append(f"project_id not in {[int(i) for i in exclude_ids]}")
    if exclude_owner_id is not None:
        parts.append(f"owner_id != {int(exclude_owner_id)}")
    if new_since_ms is not None:
        parts.append(f"published_at >= {int(new_since_ms)}")
    return " and ".join(parts)


def _hit(found: dict) -> Hit:
    entity = found["entity"]
    return Hit(project_id=int(found["id"]), score=float(found["distance"]),
               owner_id=int(entity["owner_id"]), published_at=int(entity["published_at"]),
               model_version=int(entity["model_version"]))
