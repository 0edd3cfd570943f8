"""The convergence invariant under random interleavings, against the real broker, Postgres
and Milvus: whatever the order, duplication and timing of published, updated and deleted
events, ingest's progress, restarts and model swaps, once the embedder is caught up the
collection behind the alias holds exactly what Postgres says, at each project's current
state version, embedded by the live model.

Each example is small (a few projects, a dozen steps): every restart or swap costs a group
join or a backfill of seconds, and the suite has to stay fast.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.embedder.service import Embedder
from shared import milvus as contract
from shared.events import ProjectEvent
from shared.kafka.admin import ensure_topics
from tests.services.embedder.conftest import (
    NOW_MS,
    Platform,
    client,
    drop_prefixed,
    held,
    live_ids,
    make_cnn,
    make_image,
    settle,
)

PIDS = st.integers(1, 4)
STEP = st.one_of(
    # an event; its ts moves the clock by -3..+3 s, so events arrive out of order
    st.tuples(st.just("send"), st.sampled_from(["published", "updated", "deleted"]), PIDS,
              st.integers(-3, 3)),
    st.tuples(st.just("resend"), st.integers(0, 30)),  # a duplicate of an earlier event
    st.tuples(st.just("ingest"), st.integers(1, 4)),  # ingest stores this many more
    st.tuples(st.just("turns"), st.integers(1, 4)),  # the embedder runs a few turns
    st.just(("restart",)),
    st.just(("swap",)),  # a new model is promoted
)


def fresh(esettings, db_url):
    """Each example its own topics, groups, Milvus prefix and an empty store."""
    tag = uuid.uuid4().hex[:8]
    own = esettings.model_copy(update={
        "topic_prefix": f"p{tag}.", "ingest_group": f"i{tag}", "embed_group": f"e{tag}",
        "milvus_prefix": f"p{tag}_", "embed_ingest_wait_s": 600.0})
    with psycopg.connect(db_url) as conn:
        conn.execute("TRUNCATE projects, project_events, embed_failures, consumer_offsets")
    ensure_topics(own)
    return own


class World:
    def __init__(self, settings, db_url):
        self.settings, self.db_url = settings, db_url
        self.platform = Platform(settings, db_url)
        self.embedder: Embedder | None = None
        self.sent: list[ProjectEvent] = []
        self.clock = NOW_MS() - 600_000
        self.images = settings.data_dir / "images"
        self.images.mkdir(exist_ok=True)
        self.models = 1

    def running(self) -> Embedder:
        if self.embedder is None:
            self.embedder = Embedder(self.settings)
            self.embedder.start()
        return self.embedder

    def apply(self, step: tuple) -> None:
        kind = step[0]
        if kind == "send":
            _, type_, pid, shift = step
            self.clock += 1000 + shift * 1000
            n = len(self.sent)
            uri = make_image(self.images / f"{n}.png", n)
            self._send(ProjectEvent(f"e{n}", type_, pid, 7, uri, self.clock))
        elif kind == "resend" and self.sent:
            self._send(self.sent[step[1] % len(self.sent)])
        elif kind == "ingest":
            self.platform.ingest(step[1])
        elif kind == "turns":
            for _ in range(step[1]):
                self.running().turn()
        elif kind == "restart" and self.embedder is not None:
            self.restart()
        elif kind == "swap":
            self.models += 1
            make_cnn(self.settings, self.db_url, seed=self.models)

    def restart(self) -> None:
        """Close and forget the embedder. Only once its consumer is in the group: Tansu
        leaves a group whose member left in the middle of its own join unable to
        complete a rebalance (Apache Kafka starts a new one), which is the broker's
        problem, not the embedder's."""
        embedder = self.embedder
        if embedder.stream is not None:
            settle(embedder, timeout_s=30, until=lambda: embedder.stream.source.joined)
        embedder.close()
        self.embedder = None

    def _send(self, event: ProjectEvent) -> None:
        self.sent.append(event)
        self.platform.send(event)

    def finish(self) -> None:
        self.platform.ingest()
        embedder = self.running()
        settle(embedder, self.platform, timeout_s=120)
        c = client(self.settings)
        try:
            alias = contract.alias(self.settings, contract.PROJECTS)
            assert held(c, alias) == live_ids(self.db_url)
            models = {r["model_version"] for r in c.query(
                alias, filter="project_id >= 0", output_fields=["model_version"],
                consistency_level="Strong", limit=16384)}
            assert models <= {embedder.lifecycle.live.encoder.version}
        finally:
            c.close()

    def close(self) -> None:
        if self.embedder is not None:
            self.embedder.close()
        self.platform.close()
        drop_prefixed(self.settings)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=4, max_size=12))
def test_milvus_converges_to_the_store_whatever_the_interleaving(esettings, db_url, steps):
    settings_ = fresh(esettings, db_url)
    make_cnn(settings_, db_url, seed=1)
    world = World(settings_, db_url)
    try:
        for step in steps:
            world.apply(step)
        world.finish()
    finally:
        world.close()
