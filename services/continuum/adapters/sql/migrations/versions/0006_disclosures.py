"""The disclosure record: every message disclosed to a recipient organization, insert-only.

One row per message on an organization's disclosure topic: which organization, patient and
event (id and log position), under which consent, where it landed (topic, partition, offset)
and when. With the access log, it answers a patient's request for an accounting of who received
their records. The table refuses UPDATE, DELETE and TRUNCATE, like the event log; a message is
recorded at most once (unique topic, partition, offset).

Revision ID: 0006_disclosures
Revises: 0005_access_log
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_disclosures"
down_revision = "0005_access_log"
branch_labels = None
depends_on = None

TABLE = "disclosures"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("org", sa.String(63), nullable=False),
        sa.Column("patient_key", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("consent_id", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("disclosed_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("topic", "partition", "offset", name="uq_disclosures_message"),
    )
    op.create_index("ix_disclosures_patient", TABLE, ["patient_key", "disclosed_at"])
    op.create_index("ix_disclosures_org", TABLE, ["org", "position"])
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
    raise RuntimeError("the disclosure record is append-only: there is no downgrade")
