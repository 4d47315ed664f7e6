"""Store each event's canonical wire bytes at append time.

The relay and the exporter then send stored bytes instead of rebuilding JSON from columns for
every event, and an auditor can hash exactly what was stored. Rows written before this revision
have no body; readers fall back to building it from the columns.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("events", sa.Column("body", sa.Text(), nullable=True))


def downgrade() -> None:
    raise RuntimeError("the event store is append-only: there is no downgrade")
