"""The warm-up against the real servers: as interactions reach Postgres, a new project's
row in the warm-up collection moves towards its behavioural factor, while the live
projects collection keeps the image vector."""

from __future__ import annotations

import itertools
import time
import uuid

import numpy as np
import psycopg
import pytest

from services.embedder.service import Embedder
from shared import milvus as contract
from shared import warmup as fold
from shared.client import CofeatClient
from shared.factors import factor_version, load_factors
from tests.services.embedder.conftest import (
    DIM,
    alias_target,
    client,
    make_cnn,
    make_factors,
    rows,
    seed_projects,
    settle,
)

USERS = list(range(1, 61))


def interact(db_url: str, pairs: list[tuple[int, int, int]]) -> None:
    """(user, project, type) interactions, stored as ingest stores them (one transaction)."""
    with psycopg.connect(db_url) as conn:
        for user, project, kind in pairs:
            conn.execute("INSERT INTO interactions (event_id, user_id, project_id, type, ts) "
                         "VALUES (%s, %s, %s, %s, now())",
                         (uuid.uuid4().hex, user, project, kind))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_new_project_warms_up_towards_its_behavioural_factor(esettings, db_url):
    settings = esettings.model_copy(update={"warm_poll_s": 0.2})
    fv = make_factors(settings, db_url, USERS)
    cnn = make_cnn(settings, db_url, factor_version=fv)
    seed_projects(settings, db_url, 3)
    with psycopg.connect(db_url) as conn:
        factors = load_factors(settings.data_dir, factor_version(conn, fv))
    params = fold.WarmParams.from_settings(settings)
    space = fold.space(factors.user_factors, factors.item_factors, params.regularization)
    # The project's audience: the users whose factors point one hidden way.
    hidden = np.random.default_rng(7).normal(size=factors.user_factors.shape[1])
    fans = [USERS[i] for i in np.argsort(-(factors.user_factors @ hidden))]
    everyone = [(user, 1, fold.APPRECIATE) for user in fans[:40]]
    target = fold.behavioural(factors.user_rows([u for u, _, _ in everyone]),
                              np.full(40, 4.0), space, params)

    embedder = Embedder(settings)
    c = client(settings)
    warm = contract.alias(settings, contract.WARM)
    live = contract.alias(settings, contract.PROJECTS)
    try:
        embedder.start()
        settle(embedder)
        image_vector = rows(c, live, [1])[1]["embedding"]
        seen, closeness = 0, []
        for upto in (1, 3, 10, 40):
            interact(db_url, everyone[seen:upto])
            seen = upto
            users = factors.user_rows([u for u, _, _ in everyone[:upto]])
            want = fold.served(fold.fold_in(np.asarray(image_vector), users,
                                            np.full(upto, 4.0), space, params), space)

            def arrived(want=want) -> bool:
                found = c.has_collection(warm) and rows(c, warm, [1]).get(1)
                return bool(found) and np.allclose(found["embedding"], want, atol=1e-5)

            settle(embedder, until=arrived, timeout_s=60)
            closeness.append(cosine(rows(c, warm, [1])[1]["embedding"], target))
        assert closeness == sorted(closeness) and closeness[-1] > 0.9, closeness
        assert closeness[0] < closeness[-1]
        held = rows(c, warm)
        assert set(held) == {1}, "projects without interactions keep the CNN vector only"
        assert held[1]["model_version"] == cnn
        # The live collection is untouched: similar images stay image similarity.
        assert cosine(rows(c, live, [1])[1]["embedding"], image_vector) > 0.99999
        # Projects for a user score the warmed project by its warm-up vector.
        user = fans[0]
        user_vector = c.get(contract.alias(settings, contract.USERS), ids=[user],
                            output_fields=["embedding"])[0]["embedding"]
        queries = CofeatClient.from_settings(settings)
        try:
            hit = next(h for h in queries.for_user(user, k=3) if h.project_id == 1)
        finally:
            queries.close()
        # By inner product against the unit user vector: the row's length counts.
        unit_user = np.asarray(user_vector) / np.linalg.norm(user_vector)
        assert hit.score == pytest.approx(float(unit_user @ held[1]["embedding"]), abs=1e-4)
        assert abs(hit.score - cosine(user_vector, image_vector)) > 1e-3
    finally:
        c.close()
        embedder.close()


def test_interactions_of_unknown_users_and_known_projects_are_left_out(esettings, db_url):
    """Only users with a factor pull; a project the factor version knows is not new."""
    from services.embedder.warmup import Warm
    from shared.warmup import APPRECIATE

    settings = esettings
    fv = make_factors(settings, db_url, USERS)
    with psycopg.connect(db_url) as conn:
        factors = load_factors(settings.data_dir, factor_version(conn, fv))
    factors.item_ids = np.array([5], np.int64)
    factors.item_factors = np.ones((1, factors.user_factors.shape[1]), np.float32)
    state = Warm(1, "x", factors, fold.space(factors.user_factors, factors.item_factors, 0.05))
    touched = state.add(np.array([[1, 2, APPRECIATE], [999, 3, APPRECIATE],
                                  [2, 5, APPRECIATE]], dtype=np.int64))
    assert touched == {2}
    assert state.events == {2: [(0, APPRECIATE)]}
    assert list(itertools.chain(*state.events.values())) == [(0, APPRECIATE)]


def test_start_up_scan_in_spans_reads_every_interaction_once(db_url):
    """The start-up read is split across loop turns; interactions stored meanwhile, and
    one whose transaction was still open when the scan began, are read by the polls that
    follow, never twice and never missed."""
    from services.embedder import warmup

    known = np.array([7], np.int64)
    before = [(user, 100 + user % 5, fold.APPRECIATE) for user in range(1, 31)]
    interact(db_url, before + [(1, 7, fold.APPRECIATE)])  # a known project: left out
    with psycopg.connect(db_url) as conn, psycopg.connect(db_url) as open_:
        with open_.transaction():  # in flight while the scan's snapshot is taken
            open_.execute("INSERT INTO interactions (event_id, user_id, project_id, type, "
                          "ts) VALUES ('in-flight', 99, 200, %s, now())", (fold.VIEW,))
            first, last = warmup.snapshot(conn)
        interact(db_url, [(50, 201, fold.VIEW)])  # stored after the snapshot
        seen, after, snap = [], 0, first
        while after < last:
            upto = min(after + 4, last)  # spans of 4 interactions
            seen += warmup.read_seen(conn, first, after, upto, known).tolist()
            after = upto
            snap, rows = warmup.read_since(conn, snap)
            seen += rows.tolist()
        snap, rows = warmup.read_since(conn, snap)
        seen += rows.tolist()
    expected = before + [(99, 200, fold.VIEW), (50, 201, fold.VIEW)]
    assert sorted(map(tuple, seen)) == sorted(expected)


def test_warm_up_in_small_steps_reaches_every_project(esettings, db_url, monkeypatch):
    """With spans and write chunks far smaller than the work, every new project with
    interactions still gets its warm-up row; a step with work left comes round at the
    next turn rather than after the (here hour-long) poll interval."""
    from services.embedder import warmup

    monkeypatch.setattr(warmup, "SCAN_SPAN", 7)
    monkeypatch.setattr(warmup, "WRITE_CHUNK", 2)
    settings = esettings.model_copy(update={"warm_poll_s": 3600.0})
    fv = make_factors(settings, db_url, USERS)
    make_cnn(settings, db_url, factor_version=fv)
    seed_projects(settings, db_url, 6)
    interact(db_url, [(user, project, fold.APPRECIATE)
                      for project in range(1, 7) for user in USERS[:5]])
    embedder = Embedder(settings)
    c = client(settings)
    written: list[int] = []
    original = warmup.WarmUp.write

    def counted(self, target, ids):
        written.append(len(ids))
        return original(self, target, ids)

    monkeypatch.setattr(warmup.WarmUp, "write", counted)
    try:
        embedder.start()
        settle(embedder)  # the live model serves all six projects
        part = embedder.warmup
        part.next_at = 0.0
        steps = 0
        while part.next_at <= time.monotonic():
            part.step()
            steps += 1
            assert steps < 100
        assert part.state.scan_after == part.state.scan_end == 30
        assert steps >= 30 // 7 and max(written) <= 2
        assert set(rows(c, contract.alias(settings, contract.WARM))) == set(range(1, 7))
    finally:
        c.close()
        embedder.close()


def test_an_older_layout_warm_collection_is_replaced(esettings, db_url):
    """A warm collection of the layout before inner product (unit rows, cosine, named
    `..._warm_v<model>`) behind the alias is replaced at start by the IP layout, filled
    again from the stored interactions, and dropped."""
    from tests.services.serve.world import _load

    settings = esettings.model_copy(update={"warm_poll_s": 0.2})
    fv = make_factors(settings, db_url, USERS)
    cnn = make_cnn(settings, db_url, factor_version=fv)
    seed_projects(settings, db_url, 2)
    interact(db_url, [(user, 1, fold.APPRECIATE) for user in USERS[:10]])
    old = _load(settings, contract.WARM, cnn, contract.project_schema(DIM),
                [{"project_id": 1, "embedding": [1.0] + [0.0] * (DIM - 1),
                  "model_version": cnn, "owner_id": 101, "published_at": 0,
                  "state_version": 0}])
    embedder = Embedder(settings)
    c = client(settings)
    warm = contract.alias(settings, contract.WARM)
    new = contract.collection_name(settings, contract.WARM, cnn, contract.WARM_LAYOUT)
    try:
        embedder.start()
        settle(embedder, until=lambda: alias_target(c, settings, contract.WARM) == new
               and 1 in rows(c, warm, [1]), timeout_s=60)
        assert not c.has_collection(old)
        assert c.describe_index(new, c.list_indexes(new)[0])["metric_type"] == "IP"
        assert np.linalg.norm(rows(c, warm, [1])[1]["embedding"]) != pytest.approx(1.0)
    finally:
        c.close()
        embedder.close()
