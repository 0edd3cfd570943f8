"""projects.state_version: one number per stored project state, so Milvus rows can say
which state they were embedded from; embed_failures keep the state that failed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


# A lone bigint primary key became BIGSERIAL in 0001 and 0002: an insert without an id
# would silently get a made-up project id. Ids come from producers only.
_SERIAL_KEYS = (("projects", "projects_project_id_seq"),
                ("embed_failures", "embed_failures_project_id_seq"))


def upgrade() -> None:
    for table, sequence in _SERIAL_KEYS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN project_id DROP DEFAULT")
        op.execute(f"DROP SEQUENCE IF EXISTS {sequence}")
    op.execute("CREATE SEQUENCE project_state_version")
    op.add_column("projects", sa.Column(
        "state_version", sa.BigInteger, nullable=False,
        server_default=sa.text("nextval('project_state_version')"),
        comment="new on every state change (ingest); Milvus rows carry the one they show"))
    # A failure belongs to one state: a newer state (a fixed image) is tried at once.
    op.execute("DELETE FROM embed_failures")
    op.add_column("embed_failures", sa.Column(
        "state_version", sa.BigInteger, nullable=False,
        comment="the projects.state_version whose image failed"))
    for column in ("owner_id", "published_at", "event_ts"):
        op.drop_column("embed_failures", column)


def downgrade() -> None:
    op.execute("DELETE FROM embed_failures")
    op.drop_column("embed_failures", "state_version")
    op.add_column("embed_failures", sa.Column("owner_id", sa.BigInteger, nullable=False))
    op.add_column("embed_failures", sa.Column("published_at", sa.DateTime(timezone=True),
                                              nullable=False))
    op.add_column("embed_failures", sa.Column("event_ts", sa.DateTime(timezone=True),
                                              nullable=False))
    op.drop_column("projects", "state_version")
    op.execute("DROP SEQUENCE project_state_version")
    for table, sequence in _SERIAL_KEYS:
        op.execute(f"CREATE SEQUENCE IF NOT EXISTS {sequence} OWNED BY {table}.project_id")
        op.execute(f"ALTER TABLE {table} ALTER COLUMN project_id "
                   f"SET DEFAULT nextval('{sequence}')")
