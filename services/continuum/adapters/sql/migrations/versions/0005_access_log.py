"""The access log: every read of patient-level data, insert-only (HIPAA 164.312(b)).

One row per access: when, who (subject, role, token id), through what (channel, action), which
patient or resource, for what purpose (HL7 PurposeOfUse code), the outcome (allowed or denied)
and the request id. Like the event log, the table refuses UPDATE, DELETE and TRUNCATE, so the
application can only add to it.

Revision ID: 0005_access_log
Revises: 0004_hash_chain
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_access_log"
down_revision = "0004_hash_chain"
branch_labels = None
depends_on = None

TABLE = "access_log"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("token_id", sa.String(64)),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(64)),
        sa.Column("resource", sa.String(256), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("request_id", sa.String(64)),
        sa.Column("records", sa.Integer),
    )
    op.create_index("ix_access_log_patient", TABLE, ["patient_key", "at"])
    op.create_index("ix_access_log_subject", TABLE, ["subject", "at"])
    op.create_index("ix_access_log_at", TABLE, ["at"])
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
    raise RuntimeError("the access log is append-only: there is no downgrade")
