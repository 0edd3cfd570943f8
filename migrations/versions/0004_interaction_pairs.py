"""interaction_pairs: per (user, project) event counts, kept by a trigger on interactions

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-02

The factor refresh reads one row per pair instead of one per event, and an incremental
refresh finds the events its parent did not see through a BRIN index on the inserting
transaction instead of a full scan. The trigger runs inside the statement that inserts the
events, so the counts commit with them, whichever path writes (ingest, a replay, a COPY);
`ON CONFLICT DO NOTHING` skips replayed events before the trigger sees them, so a replay
never counts twice. Existing events are aggregated once here.
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None

# Sorted so that concurrent ingest transactions lock shared pairs in the same order.
ADD_PAIRS = """
CREATE FUNCTION interaction_pairs_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO interaction_pairs AS p (user_id, project_id, views, appreciations, comments,
                                        owns, last_appreciation_seq)
    SELECT user_id, project_id, count(*) FILTER (WHERE type = 0),
           count(*) FILTER (WHERE type = 1), count(*) FILTER (WHERE type = 2),
           count(*) FILTER (WHERE type = 3), max(seq) FILTER (WHERE type = 1)
    FROM inserted GROUP BY user_id, project_id ORDER BY user_id, project_id
    ON CONFLICT (user_id, project_id) DO UPDATE SET
        views = p.views + EXCLUDED.views,
        appreciations = p.appreciations + EXCLUDED.appreciations,
        comments = p.comments + EXCLUDED.comments,
        owns = p.owns + EXCLUDED.owns,
        last_appreciation_seq = greatest(p.last_appreciation_seq,
                                         EXCLUDED.last_appreciation_seq);
    RETURN NULL;
END $$;
CREATE TRIGGER interactions_add_pairs AFTER INSERT ON interactions
REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION interaction_pairs_add();
"""

BACKFILL = """
INSERT INTO interaction_pairs (user_id, project_id, views, appreciations, comments, owns,
                               last_appreciation_seq)
SELECT user_id, project_id, count(*) FILTER (WHERE type = 0),
       count(*) FILTER (WHERE type = 1), count(*) FILTER (WHERE type = 2),
       count(*) FILTER (WHERE type = 3), max(seq) FILTER (WHERE type = 1)
FROM interactions GROUP BY user_id, project_id
"""


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
        # Room for HOT updates: most pair updates then touch no index.
        postgresql_with={"fillfactor": "90"},
    )
    op.execute(BACKFILL)
    op.execute(ADD_PAIRS)
    # xid8 has no BRIN operator class; its integer value does. Rows are appended in
    # transaction order, so each block range covers a narrow band of transactions.
    op.execute("CREATE INDEX interactions_ingest_xid_brin ON interactions USING brin "
               "(((ingest_xid::text)::bigint)) WITH (pages_per_range = 32, autosummarize = on)")


def downgrade() -> None:
    op.execute("DROP INDEX interactions_ingest_xid_brin")
    op.execute("DROP TRIGGER interactions_add_pairs ON interactions")
    op.execute("DROP FUNCTION interaction_pairs_add()")
    op.drop_table("interaction_pairs")
