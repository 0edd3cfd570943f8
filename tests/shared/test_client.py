"""shared/client.py against the session Milvus, on a world with known neighbours."""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared import client as client_module
from shared import milvus
from shared.client import CofeatClient, ModelChanged, NotFound
from shared.settings import Settings
from tests.services.serve.world import (
    FIRST_PROJECT,
    FIRST_USER,
    HOUR_MS,
    drop_world,
    load_projects,
    make_world,
    unit,
)


@pytest.fixture(scope="module")
def world(milvus_uri, tmp_path_factory):
    world = make_world(milvus_uri, tmp_path_factory.mktemp("data"))
    yield world
    drop_world(world.settings)


@pytest.fixture(scope="module")
def client(world):
    client = CofeatClient.from_settings(world.settings)
    yield client
    client.close()


def ids(hits) -> list[int]:
    return [hit.project_id for hit in hits]


def test_matches_the_milvus_contract():
    settings = Settings()
    assert (client_module.PROJECTS, client_module.USERS, client_module.WARM) == (
        milvus.PROJECTS, milvus.USERS, milvus.WARM)
    assert client_module.VECTOR_FIELD == milvus.VECTOR_FIELD
    assert {"metric_type": client_module.METRIC, "params": {"ef": settings.milvus_search_ef}} \
        == milvus.search_params(settings)


def test_is_copyable_alone():
    tree = ast.parse(Path(client_module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    # The standard library, numpy and pymilvus: nothing of cofeat's.
    assert imported - sys.stdlib_module_names == {"numpy", "pymilvus"}


def test_similar_to_project_in_order_without_itself(world, client):
    row = 7
    hits = client.similar_to_project(FIRST_PROJECT + row, k=10)
    expected = world.nearest(world.projects[row])
    assert expected[0] == FIRST_PROJECT + row  # itself, which must not come back
    assert ids(hits) == expected[1:11]
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(world.projects[row] @ world.projects[
        hits[0].project_id - FIRST_PROJECT]), abs=1e-5)
    assert hits[0].owner_id == world.owners[hits[0].project_id - FIRST_PROJECT]
    assert hits[0].model_version == world.version
    assert set(hits[0].as_dict()) == {"project_id", "score", "owner_id", "published_at",
                                      "model_version"}


def test_exclude_owner(world, client):
    row = 12
    hits = client.similar_to_project(FIRST_PROJECT + row, k=15, exclude_owner=True)
    keep = world.owners != world.owners[row]
    assert ids(hits) == world.nearest(world.projects[row], keep)[:15]
    assert all(hit.owner_id != world.owners[row] for hit in hits)


def test_for_user_ranks_the_closest_projects_first(world, client):
    for row in (0, 5):
        hits = client.for_user(FIRST_USER + row, k=20)
        assert ids(hits) == world.nearest(world.users[row])[:20]


def test_for_user_new_only(world, client):
    row = 3
    # The default window is 7 days: projects published less than 168 hours ago.
    hits = client.for_user(FIRST_USER + row, k=20, new_only=True)
    assert ids(hits) == world.nearest(world.users[row], np.arange(300) < 168)[:20]
    since = int(time.time() * 1000) - 24 * HOUR_MS
    hits = client.for_user(FIRST_USER + row, k=50, new_since_ms=since)
    assert ids(hits) == world.nearest(world.users[row], np.arange(300) < 24)
    assert all(hit.published_at >= since for hit in hits)


def test_for_user_scores_warmed_projects_by_their_warm_up_vector(milvus_uri, tmp_path):
    """The 25 nearest projects are warmed away from the user, one far one towards them; a
    warm row of another model version counts for nothing. k=20 needs three rounds."""
    from tests.services.serve.world import _load

    world = make_world(milvus_uri, tmp_path)
    user = world.users[0]
    order = [pid - FIRST_PROJECT for pid in world.nearest(user)]
    warm = {row: -user for row in order[:25]} | {order[60]: user}
    rows = [{"project_id": FIRST_PROJECT + r, "embedding": v.tolist(),
             "model_version": world.version, "owner_id": int(world.owners[r]),
             "published_at": int(world.published[r]), "state_version": 0}
            for r, v in warm.items()]
    stale = order[25]  # its warm row belongs to another model: its image vector counts
    rows.append({**rows[0], "project_id": FIRST_PROJECT + stale, "model_version": 99})
    _load(world.settings, milvus.WARM, world.version, milvus.project_schema(len(user)), rows)
    client = CofeatClient.from_settings(world.settings)
    plain = CofeatClient.from_settings(world.settings, warm=False)
    try:
        hits = client.for_user(FIRST_USER, k=20)
        assert ids(hits) == [FIRST_PROJECT + r for r in [order[60], *order[25:44]]]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert ids(plain.for_user(FIRST_USER, k=20)) == world.nearest(user)[:20]
        # similar-project queries never read the warm-up collection
        assert ids(client.similar_to_project(FIRST_PROJECT + order[0], k=5)) == \
            ids(plain.similar_to_project(FIRST_PROJECT + order[0], k=5))
    finally:
        client.close()
        plain.close()
        drop_world(world.settings)


def test_warm_rows_rank_by_their_length_in_the_inner_product_layout(milvus_uri, tmp_path):
    """The embedder's layout: warm rows at their length over the prior's, indexed IP. A
    row in the user's direction at length 1 scores as a perfect image match does (1.0), at
    length 3 it scores 3, and a long row pointing away scores below every image match."""
    from tests.services.serve.world import _load

    world = make_world(milvus_uri, tmp_path)
    user = world.users[0]
    order = [pid - FIRST_PROJECT for pid in world.nearest(user)]
    direction = user / np.linalg.norm(user)
    lengths = {order[100]: 3.0, order[101]: 1.0, order[0]: -5.0}
    rows = [{"project_id": FIRST_PROJECT + r, "embedding": (direction * length).tolist(),
             "model_version": world.version, "owner_id": int(world.owners[r]),
             "published_at": int(world.published[r]), "state_version": 0}
            for r, length in lengths.items()]
    _load(world.settings, milvus.WARM, world.version, milvus.project_schema(len(user)), rows,
          metric=milvus.WARM_METRIC)
    client = CofeatClient.from_settings(world.settings)
    try:
        hits = client.for_user(FIRST_USER, k=5)
        assert ids(hits)[:2] == [FIRST_PROJECT + order[100], FIRST_PROJECT + order[101]]
        assert [h.score for h in hits[:2]] == [pytest.approx(3.0, abs=1e-3),
                                               pytest.approx(1.0, abs=1e-3)]
        assert FIRST_PROJECT + order[0] not in ids(hits)
        assert ids(hits)[2:] == [FIRST_PROJECT + r for r in order[1:4]]
    finally:
        client.close()
        drop_world(world.settings)


def test_unknown_ids_raise_not_found(client):
    with pytest.raises(NotFound, match="project 999999"):
        client.similar_to_project(999_999)
    with pytest.raises(NotFound, match="user 999999"):
        client.for_user(999_999)


def test_similar_to_vector_checks_its_input(world, client):
    assert ids(client.similar_to_vector(world.projects[0] * 3, k=1)) == [FIRST_PROJECT]
    for bad in ([], [[1.0, 2.0]], np.zeros(16), [np.nan] * 16):
        with pytest.raises(ValueError):
            client.similar_to_vector(bad)


def test_collection_version(world, client):
    assert client.collection_version() == world.version


# -- the cache of project vectors ---------------------------------------------------------


def test_cached_vectors_follow_the_alias_to_a_new_version(milvus_uri, tmp_path):
    world = make_world(milvus_uri, tmp_path)
    client = CofeatClient.from_settings(world.settings)
    fetches = counting(client.milvus, "get")
    try:
        row = 7
        first = client.similar_to_project(FIRST_PROJECT + row, k=10)
        assert client.similar_to_project(FIRST_PROJECT + row, k=10) == first
        assert fetches() == 1  # the second query needed one search, no fetch
        # The embedder swaps the alias to version 2, whose vectors differ.
        other = unit(np.random.default_rng(1).normal(size=world.projects.shape))
        load_projects(world.settings, 2, world.project_ids, other, world.owners,
                      world.published)
        hits = client.similar_to_project(FIRST_PROJECT + row, k=10)
        keep = np.arange(len(other)) != row
        assert ids(hits) == [int(FIRST_PROJECT + r) for r in np.argsort(
            -(other @ other[row]), kind="stable") if keep[r]][:10]
        assert {hit.model_version for hit in hits} == {2}
        assert fetches() == 2
    finally:
        client.close()
        drop_world(world.settings)


def counting(target, name: str):
    """Counts calls of target.name from now on; returns a function that tells how many."""
    calls, original = [0], getattr(target, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(target, name, wrapper)
    return lambda: calls[0]


class AliasOnTheMove:
    """get and search like MilvusClient, where every search already sees the next version."""

    def __init__(self):
        self.version = 1

    def get(self, collection, ids, **kwargs):
        return [{"project_id": ids[0], "embedding": [1.0, 0.0], "owner_id": 3,
                 "model_version": self.version}]

    def search(self, collection, **kwargs):
        self.version += 1
        return [[{"id": 2, "distance": 0.5, "entity": {
            "owner_id": 4, "published_at": 0, "model_version": self.version}}]]


def test_an_alias_that_keeps_moving_is_an_error_not_a_mixed_answer():
    client = CofeatClient("http://unused", milvus=AliasOnTheMove())
    with pytest.raises(ModelChanged, match="retry"):
        client.similar_to_project(1)
    assert not client.recent.rows


def test_the_cache_is_bounded_in_size_and_age(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: now[0])
    recent = client_module._Recent(size=2, ttl_s=5.0)
    for key in (1, 2, 3):
        recent.put(key, {"key": key})
    assert recent.get(1) is None and recent.get(2) == {"key": 2}
    recent.put(4, {"key": 4})  # 3 is now the least recently used
    assert recent.get(3) is None and recent.get(2) == {"key": 2}
    now[0] += 5.1
    assert recent.get(2) is None and recent.get(4) is None
    off = client_module._Recent(size=0, ttl_s=5.0)
    off.put(1, {"key": 1})
    assert off.get(1) is None
