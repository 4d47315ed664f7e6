"""Alembic environment: migrations run on a connection handed in by `continuum db upgrade`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from continuum.adapters.sql.tables import metadata

connection: Connection | None = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - always called through continuum.adapters.sql.migrate
    raise RuntimeError("run migrations with `continuum db upgrade`")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
