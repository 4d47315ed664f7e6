"""Hash chain over the global log: one sealed hash per position, insert-only.

Each row holds chain_hash(previous hash, wire bytes of the event at that position), see
continuum_events.chain and docs/verify.md. ``continuum seal`` writes it; ``continuum verify``
recomputes it. Like events and event_log, the table refuses UPDATE and DELETE.

Revision ID: 0004_hash_chain
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_hash_chain"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLE = "log_hashes"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # continuum_refuse_change() was created by revision 0001.
        op.execute(
            f"CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE ON {TABLE} "
            "FOR EACH ROW EXECUTE FUNCTION continuum_refuse_change()"
        )
        op.execute(
            f"CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} "
            "FOR EACH STATEMENT EXECUTE FUNCTION continuum_refuse_change()"
        )
    else:
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {TABLE}_no_{operation.lower()} BEFORE {operation} ON {TABLE} "
                f"BEGIN SELECT RAISE(ABORT, 'table {TABLE} is append-only: {operation} "
                "refused'); END"
            )


def downgrade() -> None:
    raise RuntimeError("the event store is append-only: there is no downgrade")
