"""interaction store, offsets and model versions

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interactions",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(always=False), nullable=False, unique=True),
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("project_id", sa.BigInteger, nullable=False),
        sa.Column("type", sa.SmallInteger, nullable=False,
                  comment="0 view, 1 appreciate, 2 comment, 3 own (see shared.events)"),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("type BETWEEN 0 AND 3", name="interactions_type_known"),
    )
    op.execute("ALTER TABLE interactions ADD COLUMN ingest_xid xid8 NOT NULL "
               "DEFAULT pg_current_xact_id()")
    op.create_table(
        "project_events",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(always=False), nullable=False, unique=True),
        sa.Column("project_id", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("owner_id", sa.BigInteger, nullable=False),
        sa.Column("image_uri", sa.Text, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("project_events_project_id", "project_events", ["project_id"])
    op.create_table(
        "projects",
        sa.Column("project_id", sa.BigInteger, primary_key=True),
        sa.Column("owner_id", sa.BigInteger, nullable=False),
        sa.Column("image_uri", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_event_id", sa.Text, nullable=False),
        sa.CheckConstraint("status IN ('live', 'deleted')", name="projects_status_known"),
    )
    op.create_table(
        "consumer_offsets",
        sa.Column("group_id", sa.Text, primary_key=True),
        sa.Column("topic", sa.Text, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("kind", sa.Text, nullable=False, comment="factors | cnn"),
        sa.Column("parent_id", sa.BigInteger, nullable=True),
        sa.Column("factor_version_id", sa.BigInteger, nullable=True,
                  comment="for cnn versions: the factor version it learned from"),
        sa.Column("watermark", sa.BigInteger, nullable=True,
                  comment="highest interactions.seq the version covered"),
        sa.Column("params", JSONB, nullable=False, server_default="{}"),
        sa.Column("stats", JSONB, nullable=False, server_default="{}"),
        sa.Column("metrics", JSONB, nullable=False, server_default="{}"),
        sa.Column("artifact", sa.Text, nullable=True, comment="path under COFEAT_DATA_DIR"),
        sa.Column("status", sa.Text, nullable=False, server_default="candidate"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.CheckConstraint("kind IN ('factors', 'cnn')", name="model_versions_kind_known"),
        sa.CheckConstraint(
            "status IN ('candidate', 'promoted', 'rejected', 'failed', 'retired')",
            name="model_versions_status_known"),
    )
    op.create_index("model_versions_kind_status", "model_versions", ["kind", "status"])


def downgrade() -> None:
    for table in ("model_versions", "consumer_offsets", "projects", "project_events",
                  "interactions"):
        op.drop_table(table)
