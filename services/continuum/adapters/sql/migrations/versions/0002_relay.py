"""Checkpoints for relays and consumers; wake-up notifications on append (PostgreSQL).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NOTIFY_CHANNEL = "continuum_events"


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # NOTIFY is transactional: listeners hear it only when the append commits. The payload
        # is the schema, so listeners of one database can tell their store's appends apart.
        op.execute(
            f"""
            CREATE FUNCTION continuum_notify_append() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              PERFORM pg_notify('{NOTIFY_CHANNEL}', current_schema());
              RETURN NULL;
            END $$
            """
        )
        op.execute(
            "CREATE TRIGGER event_pending_notify AFTER INSERT ON event_pending "
            "FOR EACH STATEMENT EXECUTE FUNCTION continuum_notify_append()"
        )


def downgrade() -> None:
    raise RuntimeError("the event store is append-only: there is no downgrade")
