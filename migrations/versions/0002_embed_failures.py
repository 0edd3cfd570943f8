"""embed_failures: project images the embedder could not read, retried then parked

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "embed_failures",
        sa.Column("project_id", sa.BigInteger, primary_key=True),
        sa.Column("image_uri", sa.Text, nullable=False),
        # The rest of the failed state, so a retry needs no other table (ingest may lag).
        sa.Column("owner_id", sa.BigInteger, nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_ts", sa.DateTime(timezone=True), nullable=False,
                  comment="ts of the event whose image failed"),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False,
                  comment="parked once attempts reach COFEAT_EMBED_MAX_ATTEMPTS"),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("embed_failures")
