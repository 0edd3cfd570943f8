"""A thin client for cofeat's vectors in Milvus, for any service that wants similar projects.

It depends only on pymilvus and numpy, so another service can copy this file as it is.
Every query goes through the aliases `<prefix>cofeat_projects` and `<prefix>cofeat_users`
(see shared/milvus.py), which always point at one complete model version.

    client = CofeatClient("http://milvus:19530", prefix="")
    client.similar_to_project(42, k=10, exclude_owner=True)
    client.for_user(7, k=20, new_only=True)

`for_user` also reads `<prefix>cofeat_projects_warm` when that alias exists: a new
project with its first interactions folded in (the embedder's warm-up) scores by that
vector there, every other project by its image vector. The warm rows keep their length
and are ranked by inner product against the unit user vector, so a warm score is the
cosine the image vector would get times how far behaviour has stretched it; the search
names no metric there, so an older warm collection (unit rows, cosine) still answers.
Similar-project queries never read it. `warm=False` turns this off.

Results are `Hit`s (use `hit.as_dict()` for JSON). An id that is not in the collection
raises `NotFound`; Milvus being down or an alias missing raises pymilvus' MilvusException.

`similar_to_project` keeps the vectors it fetched for `cache_ttl_s` (at most `cache_size`
of them): a project asked for again costs one search instead of a fetch and a search. A
cached vector may be that much staler than Milvus (an updated image, a deleted project);
all are dropped once a search shows the alias has moved to another model version.
`cache_size=0` turns this off.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

# Same names as shared/milvus.py (tests/shared/test_client.py checks they agree).
PROJECTS = "cofeat_projects"
USERS = "cofeat_users"
WARM = "cofeat_projects_warm"  # new projects' warm-up vectors: read by for_user only
VECTOR_FIELD = "embedding"
PROJECT_FIELDS = ["owner_id", "published_at", "model_version"]
# What similar_to_project needs of the project it starts from.
SOURCE_FIELDS = [VECTOR_FIELD, "owner_id", "model_version"]
METRIC = "COSINE"
DAY_S = 86_400
MAX_LIMIT = 16_384  # Milvus' largest topk
COLLECTION_NOT_FOUND = 100  # Milvus' error code for a missing collection or alias


class NotFound(LookupError):
    """The project or user id has no vector in the current model version."""


class ModelChanged(MilvusException):
    """The alias moved to another model version between the calls of one query, again and
    again; like an outage, a retry later will do."""

    def __init__(self, message: str) -> None:
        super().__init__(message=message)


@dataclass(frozen=True)
class Hit:
    project_id: int
    score: float  # cosine similarity, higher is closer
    owner_id: int
    published_at: int  # epoch ms
    model_version: int

    def as_dict(self) -> dict:
        # Not dataclasses.asdict: it deep-copies every field, ~10x slower per hit.
        return {"project_id": self.project_id, "score": self.score, "owner_id": self.owner_id,
                "published_at": self.published_at, "model_version": self.model_version}


class _Recent:
    """The latest `size` rows by key, each for `ttl_s` after it was stored; thread-safe
    (the HTTP API answers from a thread pool)."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size, self.ttl_s = size, ttl_s
        self.rows: OrderedDict[int, tuple[float, dict]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: int) -> dict | None:
        with self.lock:
            stored, row = self.rows.get(key, (0.0, None))
            if row is None or time.monotonic() - stored > self.ttl_s:
                return None
            self.rows.move_to_end(key)
            return row

    def put(self, key: int, row: dict) -> None:
        if self.size <= 0 or self.ttl_s <= 0:
            return
        with self.lock:
            self.rows[key] = (time.monotonic(), row)
            self.rows.move_to_end(key)
            while len(self.rows) > self.size:
                self.rows.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.rows.clear()


class CofeatClient:
    def __init__(self, uri: str, token: str | None = None, prefix: str = "", *,
                 ef: int = 64, timeout_s: float = 10.0, new_window_s: float = 7 * DAY_S,
                 consistency: str = "Bounded", cache_size: int = 10_000,
                 cache_ttl_s: float = 5.0, warm: bool = True,
                 milvus: MilvusClient | None = None) -> None:
        # Bounded: a query may miss writes of the last few seconds but never waits for
        # them (Strong adds ~200 ms per query); the aliases switch whole versions anyway.
        # dedicated: a channel of its own, not one shared per address that another client
        # in the process may close or that may sit in gRPC's backoff after an outage.
        self.milvus = milvus or MilvusClient(uri=uri, token=token or "", timeout=timeout_s,
                                             dedicated=True)
        self.projects = prefix + PROJECTS
        self.users = prefix + USERS
        self.warm = prefix + WARM if warm else None
        self._warm_seen = (-float("inf"), False)  # (when checked, alias present)
        self.ef = ef
        self.timeout_s = timeout_s
        self.new_window_s = new_window_s
        self.consistency = consistency
        self.recent = _Recent(cache_size, cache_ttl_s)

    @classmethod
    def from_settings(cls, settings, **kwargs) -> CofeatClient:
        """From a cofeat `Settings` (duck-typed, so this file needs no cofeat import)."""
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
        options = {"ef": settings.milvus_search_ef, "timeout_s": settings.milvus_timeout_s,
                   "new_window_s": getattr(settings, "serve_new_window_s", 7 * DAY_S),
                   "cache_size": getattr(settings, "serve_cache_size", 10_000),
                   "cache_ttl_s": getattr(settings, "serve_cache_ttl_s", 5.0),
                   "warm": getattr(settings, "warm_enabled", True)}
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

    def _get(self, collection: str, key: int, what: str, fields: Sequence[str] = ()) -> dict:
        rows = self.milvus.get(collection, ids=[int(key)], output_fields=list(fields),
                               timeout=self.timeout_s, consistency_level=self.consistency)
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
        cached = self.recent.get(project_id)
        fetched = (self._get(self.projects, project_id, "project", SOURCE_FIELDS)
                   for _ in range(3))
        for row in itertools.chain([cached] if cached else [], fetched):
            hits = self._around(project_id, row, k, exclude_owner)
            if row is not cached and not hits:
                return hits  # a filter left nothing: no version to compare
            if hits and hits[0].model_version == row["model_version"]:
                if row is not cached:
                    self.recent.put(project_id, row)
                return hits
            # The alias moved to another model version since this vector was read (or a
            # cached vector found nothing, which proves nothing): every cached vector
            # belongs to the old one, and a fetched one came from the old collection.
            self.recent.clear()
        raise ModelChanged(f"the alias {self.projects} kept moving during the query: retry")

    def _around(self, project_id: int, row: dict, k: int, exclude_owner: bool) -> list[Hit]:
        if exclude_owner:  # the owner's filter drops the project itself too
            return self.similar_to_vector(row[VECTOR_FIELD], k,
                                          exclude_owner_id=row["owner_id"])
        # One more neighbour instead of an id filter: Milvus evaluates a filter on every
        # row, and the project is usually its own nearest neighbour.
        hits = self.similar_to_vector(row[VECTOR_FIELD], k + 1)
        return [hit for hit in hits if hit.project_id != project_id][:k]

    def for_user(self, user_id: int, k: int = 20, new_only: bool = False,
                 new_since_ms: int | None = None) -> list[Hit]:
        """Projects whose vectors score highest against the user's; `new_only` keeps those
        published within `new_window_s` (or since `new_since_ms` when given)."""
        user = self._get(self.users, user_id, "user")
        if new_only and new_since_ms is None:
            new_since_ms = int((time.time() - self.new_window_s) * 1000)
        hits = self._recommend(user[VECTOR_FIELD], k, new_since_ms, user["model_version"])
        if hits and hits[0].model_version != user["model_version"]:
            # The users alias lags the projects one (the new model has no user vectors):
            # scores across two vector spaces would be meaningless.
            raise NotFound(f"user {user_id} has a vector of model version "
                           f"{user['model_version']}, the projects are of {hits[0].model_version}")
        return hits

    def _recommend(self, vector, k: int, new_since_ms: int | None,
                   model_version: int) -> list[Hit]:
        """The top k where a project with a warm-up row scores by it and every other one by
        its image vector. A warmed project in the merged top k is in the warm top k, so
        the projects search only has to yield k projects without a warm row."""
        where = _filter((), None, new_since_ms)
        warm = self._warm_hits(vector, k, where, model_version)
        if warm is None:
            return self.similar_to_vector(vector, k, new_since_ms=new_since_ms)
        limit = k
        while True:
            hits = self._search(self.projects, vector, limit, where)
            warmed = self._warm_ids([hit.project_id for hit in hits], model_version)
            plain = [hit for hit in hits if hit.project_id not in warmed]
            if len(plain) >= k or len(hits) < limit or limit >= MAX_LIMIT:
                break
            limit = min(MAX_LIMIT, limit + len(warmed))
        return sorted([*warm, *plain], key=lambda hit: -hit.score)[:k]

    def _warm_hits(self, vector, k: int, where: str, model_version: int) -> list[Hit] | None:
        """The warm collection's top k of this model version; None without one."""
        if self.warm is None or not self._warm_present():
            return None
        try:
            # No metric named: the collection's own (IP now, COSINE in the older layout).
            hits = self._search(self.warm, vector, k, where, metric=None)
        except MilvusException as error:
            if error.code != COLLECTION_NOT_FOUND:
                raise
            self._warm_seen = (time.monotonic(), False)
            return None
        return [hit for hit in hits if hit.model_version == model_version]

    def _warm_present(self) -> bool:
        # One listing per cache_ttl_s, not per query: a missing alias is not an RPC error.
        checked, present = self._warm_seen
        if time.monotonic() - checked > max(self.recent.ttl_s, 1.0):
            present = self.warm in self.milvus.list_aliases(timeout=self.timeout_s)["aliases"]
            self._warm_seen = (time.monotonic(), present)
        return present

    def _warm_ids(self, ids: list[int], model_version: int) -> set[int]:
        """Which of `ids` have a warm row of this model version."""
        if not ids:
            return set()
        where = (f"project_id in {[int(i) for i in ids]} "
                 f"and model_version == {int(model_version)}")
        try:
            rows = self.milvus.query(self.warm, filter=where, output_fields=["project_id"],
                                     timeout=self.timeout_s,
                                     consistency_level=self.consistency)
        except MilvusException as error:
            if error.code != COLLECTION_NOT_FOUND:
                raise
            return set()
        return {int(row["project_id"]) for row in rows}

    def similar_to_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10, *,
                          exclude_ids: Sequence[int] = (), exclude_owner_id: int | None = None,
                          new_since_ms: int | None = None) -> list[Hit]:
        return self._search(self.projects, vector, k,
                            _filter(exclude_ids, exclude_owner_id, new_since_ms))

    def _search(self, collection: str, vector, k: int, where: str,
                metric: str | None = METRIC) -> list[Hit]:
        query = _unit(vector)
        # HNSW needs ef >= k; the filter is applied inside the search, so k hits come
        # back even when it removes many neighbours.
        params = {"params": {"ef": max(self.ef, k)}}
        if metric:
            params["metric_type"] = metric
        results = self.milvus.search(
            collection, data=[query.tolist()], anns_field=VECTOR_FIELD, limit=k,
            filter=where, output_fields=PROJECT_FIELDS, search_params=params,
            timeout=self.timeout_s, consistency_level=self.consistency)
        return [_hit(found) for found in results[0]]


def epoch_ms(moment: datetime) -> int:
    """Epoch milliseconds, as in `published_at`; a time without a zone is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


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
