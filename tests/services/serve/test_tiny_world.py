"""for-user on the simulator's tiny world: the real factor and CNN refresh learn from the
first 70% of the stream, the real embedder fills Milvus, and each user's appreciations in
the remaining 30% must rank above where a random ranking would put them."""

from __future__ import annotations

import uuid
from collections import defaultdict

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient

from services.embedder.service import Embedder
from services.refresh.cnn.service import run_cnn_once
from services.refresh.factors.service import run_factors_once
from services.serve.app import create_app
from shared.client import CofeatClient, NotFound
from shared.events import InteractionType
from shared.kafka.admin import ensure_topics
from tests.services.embedder.conftest import drop_prefixed
from tests.services.refresh.cnn.test_service import FAST
from tests.world import load

PAST = 0.7  # share of the stream the models learn from; the rest is the future
K = 20
# The `small` demo's model sizes: with 16 factors and 32 px the CNN came out barely above
# random on some tiny worlds (1.4x on seed 4).
MODELS = dict(cnn_image_size=64, cnn_epochs=8, als_factors=32)


@pytest.fixture
def served(settings, milvus_uri, db_url, tiny_world):
    """Settings of a world whose models know only the past and whose vectors are in
    Milvus; and the highest interaction seq of that past."""
    own = settings.model_copy(update={
        **FAST, **MODELS, "milvus_uri": milvus_uri, "milvus_prefix": f"t{uuid.uuid4().hex[:8]}_",
        "embed_workers": 0, "milvus_hnsw_ef_construction": 64,
        "image_roots": str(tiny_world / "images")})
    load(db_url, tiny_world / "events", stop=PAST)
    assert run_factors_once(own, full=True).status == "promoted"
    assert run_cnn_once(own, show_progress=False).status == "promoted"
    with psycopg.connect(db_url) as conn:
        watermark = conn.execute("SELECT max(seq) FROM interactions").fetchone()[0]
    # The future too, before embedding: its new projects get vectors from their images
    # alone, as they would once published; the models never see its interactions.
    load(db_url, tiny_world / "events", start=PAST)
    ensure_topics(own)
    try:
        assert Embedder(own, drain=True).run() == 0
        yield own, watermark
    finally:
        drop_prefixed(own)


def histories(db_url: str, watermark: int) -> tuple[dict, dict]:
    """Per user: every project touched up to the watermark, and the projects appreciated
    after it."""
    past, future = defaultdict(set), defaultdict(set)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT user_id, project_id, type, seq FROM interactions")
        for user, project, kind, seq in rows:
            if seq <= watermark:
                past[user].add(project)
            elif kind == InteractionType.appreciate:
                future[user].add(project)
    return past, future


def recall_against_random(client: CofeatClient, projects: set[int], past: dict,
                          future: dict) -> dict[int, tuple[float, float]]:
    """Per user with new future appreciations (projects never touched before): their
    recall@K in the user's ranking without the past, and what a random ranking of the
    candidates left expects, K / their number."""
    scores = {}
    for user, appreciated in future.items():
        seen = past[user] & projects
        wanted = (appreciated & projects) - seen
        if not wanted:
            continue
        try:
            hits = client.for_user(user, k=K + len(seen))
        except NotFound:  # filtered out of the factors: no vector
            continue
        ranked = [hit.project_id for hit in hits if hit.project_id not in seen][:K]
        scores[user] = (len(wanted.intersection(ranked)) / len(wanted),
                        K / (len(projects) - len(seen)))
    return scores


def test_for_user_ranks_future_appreciations_above_random(served, db_url):
    settings, watermark = served
    client = CofeatClient.from_settings(settings)
    try:
        projects = {row["project_id"] for row in client.milvus.query(
            client.projects, filter="project_id >= 0", output_fields=["project_id"],
            limit=16_384, consistency_level="Strong")}
        scores = recall_against_random(client, projects, *histories(db_url, watermark))
        assert len(scores) >= 20, "too few users with new future appreciations to judge"
        recall, chance = np.mean(list(scores.values()), axis=0)
        print(f"recall@{K} {recall:.3f} over {len(scores)} users, random {chance:.3f}")
        # Measured on the tiny worlds of seeds 0-6: 0.080-0.173 against 0.045 (1.8-3.8x).
        assert recall > 1.5 * chance, (recall, chance)
        # The HTTP API answers with the same ranking.
        user = next(iter(scores))
        response = TestClient(create_app(settings, client)).get(  # no lifespan: no CNN
            f"/v1/users/{user}/recommendations", params={"k": K})
        assert [hit["project_id"] for hit in response.json()["results"]] == \
            [hit.project_id for hit in client.for_user(user, k=K)]
    finally:
        client.close()
