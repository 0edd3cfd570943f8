"""The interaction store's tables: the one definition every service and migration uses."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Sequence,
    SmallInteger,
    Table,
    Text,
    func,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import UserDefinedType

metadata = MetaData()


class XID8(UserDefinedType):
    """Postgres `xid8`: the inserting transaction, to tell exactly what a snapshot missed."""

    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "xid8"


# One row per event; `seq` orders ingestion so refreshes can pick up "what is new since".
interactions = Table(
    "interactions", metadata,
    Column("event_id", Text, primary_key=True),
    Column("seq", BigInteger, Identity(always=False), nullable=False, unique=True),
    Column("user_id", BigInteger, nullable=False),
    Column("project_id", BigInteger, nullable=False),
    Column("type", SmallInteger, nullable=False,
           comment="0 view, 1 appreciate, 2 comment, 3 own (see shared.events)"),
    Column("ts", DateTime(timezone=True), nullable=False),
    # seq alone cannot say what a refresh missed: concurrent batches commit out of seq order.
    # A refresh records pg_current_snapshot(); the next one re-reads rows whose ingest_xid
    # that snapshot did not see (pg_visible_in_snapshot).
    Column("ingest_xid", XID8, nullable=False, server_default=text("pg_current_xact_id()")),
    CheckConstraint("type BETWEEN 0 AND 3", name="interactions_type_known"),
    # xid8 has no BRIN operator class; its integer value does (migration 0004).
    Index("interactions_ingest_xid_brin", text("((ingest_xid::text)::bigint)"),
          postgresql_using="brin",
          postgresql_with={"pages_per_range": 32, "autosummarize": "on"}),
)

# Event counts per (user, project), for the factor refresh to read one row per pair. Folded
# in by a full refresh (services/refresh/factors/read.py), not by ingest: they hold exactly
# the events visible to interaction_pairs_state.snapshot. (The BRIN index on interactions'
# ingest_xid, as an integer, finds the events a snapshot missed.)
interaction_pairs = Table(
    "interaction_pairs", metadata,
    Column("user_id", BigInteger, primary_key=True),
    Column("project_id", BigInteger, primary_key=True),
    Column("views", Integer, nullable=False, server_default="0"),
    Column("appreciations", Integer, nullable=False, server_default="0"),
    Column("comments", Integer, nullable=False, server_default="0"),
    Column("owns", Integer, nullable=False, server_default="0"),
    Column("last_appreciation_seq", BigInteger, nullable=True,
           comment="highest interactions.seq of an appreciation: the held-out pair"),
    postgresql_with={"fillfactor": "90"},
)

interaction_pairs_state = Table(
    "interaction_pairs_state", metadata,
    Column("id", Boolean, primary_key=True, server_default=true()),
    Column("snapshot", Text, nullable=True,
           comment="pg_snapshot whose visible events the pairs hold; NULL: none"),
    Column("folded_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("id", name="interaction_pairs_state_one_row"),
)

# Every project event as received, so deletes and updates are recorded, not lost.
project_events = Table(
    "project_events", metadata,
    Column("event_id", Text, primary_key=True),
    Column("seq", BigInteger, Identity(always=False), nullable=False, unique=True),
    Column("project_id", BigInteger, nullable=False),
    Column("type", Text, nullable=False),
    Column("owner_id", BigInteger, nullable=False),
    Column("image_uri", Text, nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Index("project_events_project_id", "project_id"),
)

# The latest state per project, derived from project_events in the same transaction.
project_state_version = Sequence("project_state_version", metadata=metadata)
projects = Table(
    "projects", metadata,
    Column("project_id", BigInteger, primary_key=True, autoincrement=False),
    Column("owner_id", BigInteger, nullable=False),
    Column("image_uri", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_event_id", Text, nullable=False),
    Column("state_version", BigInteger, nullable=False,
           server_default=text("nextval('project_state_version')"),
           comment="new on every state change (ingest); Milvus rows carry the one they show"),
    CheckConstraint("status IN ('live', 'deleted')", name="projects_status_known"),
)

# Postgres, not Kafka, is the truth for where each consumer group stands.
consumer_offsets = Table(
    "consumer_offsets", metadata,
    Column("group_id", Text, primary_key=True),
    Column("topic", Text, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

model_versions = Table(
    "model_versions", metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("kind", Text, nullable=False, comment="factors | cnn"),
    Column("parent_id", BigInteger, nullable=True),
    Column("factor_version_id", BigInteger, nullable=True,
           comment="for cnn versions: the factor version it learned from"),
    Column("watermark", BigInteger, nullable=True,
           comment="highest interactions.seq the version covered"),
    Column("params", JSONB, nullable=False, server_default="{}"),
    Column("stats", JSONB, nullable=False, server_default="{}"),
    Column("metrics", JSONB, nullable=False, server_default="{}"),
    Column("artifact", Text, nullable=True, comment="path under COFEAT_DATA_DIR"),
    Column("status", Text, nullable=False, server_default="candidate"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('factors', 'cnn')", name="model_versions_kind_known"),
    CheckConstraint("status IN ('candidate', 'promoted', 'rejected', 'failed', 'retired')",
                    name="model_versions_status_known"),
    Index("model_versions_kind_status", "kind", "status"),
)

# Project images the embedder could not read or decode: retried up to
# COFEAT_EMBED_MAX_ATTEMPTS times, then parked (left out of Milvus) until the project's
# state changes (an `updated` event with a fixed image) or a later embed succeeds.
embed_failures = Table(
    "embed_failures", metadata,
    Column("project_id", BigInteger, primary_key=True, autoincrement=False),
    Column("image_uri", Text, nullable=False),
    Column("state_version", BigInteger, nullable=False,
           comment="the projects.state_version whose image failed"),
    Column("reason", Text, nullable=False),
    Column("attempts", Integer, nullable=False,
           comment="parked once attempts reach COFEAT_EMBED_MAX_ATTEMPTS"),
    Column("first_failed_at", DateTime(timezone=True), nullable=False,
           server_default=func.now()),
    Column("last_failed_at", DateTime(timezone=True), nullable=False,
           server_default=func.now()),
)
