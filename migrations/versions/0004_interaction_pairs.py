"""interaction_pairs: per (user, project) event counts, folded in by the factor refresh

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-02

A full factor refresh reads one row per pair instead of one per event. Ingest does not
touch the pairs (keeping them there cost ingest about 65% more Postgres CPU per event): a
full refresh first folds in the events that `interaction_pairs_state.snapshot` did not see,
in the same transaction that records the new snapshot and reads the pairs, so every event
is counted exactly once. The table starts empty: the first full refresh folds every event.
An incremental refresh finds the events its parent did not see through the BRIN index on
the inserting transaction instead of a full scan.
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    counts = [sa.Column(name, sa.Integer, nullable=False, server_default="0")
              for name in ("views", "appreciations", "comments", "owns")]
    op.create_table(
        "interaction_pairs",
        sa.Column("user_id", sa.BigInteger, primary_key=True),
        sa.Column("project_id", sa.BigInteger, primary_key=True),
        *counts,
        sa.Column("last_appreciation_seq", sa.BigInteger, nullable=True,
                  comment="highest interactions.seq of an appreciation: the held-out pair"),
        # Room for HOT updates: a fold then rewrites most pairs without touching the index.
        postgresql_with={"fillfactor": "90"},
    )
    op.create_table(
        "interaction_pairs_state",
        sa.Column("id", sa.Boolean, primary_key=True, server_default=sa.true()),
        sa.Column("snapshot", sa.Text, nullable=True,
                  comment="pg_snapshot whose visible events the pairs hold; NULL: none"),
        sa.Column("folded_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("id", name="interaction_pairs_state_one_row"),
    )
    op.execute("INSERT INTO interaction_pairs_state (id) VALUES (true)")
    # xid8 has no BRIN operator class; its integer value does. Rows are appended in
    # transaction order, so each block range covers a narrow band of transactions.
    op.execute("CREATE INDEX interactions_ingest_xid_brin ON interactions USING brin "
               "(((ingest_xid::text)::bigint)) WITH (pages_per_range = 32, autosummarize = on)")


def downgrade() -> None:
    op.execute("DROP INDEX interactions_ingest_xid_brin")
    op.drop_table("interaction_pairs_state")
    op.drop_table("interaction_pairs")
