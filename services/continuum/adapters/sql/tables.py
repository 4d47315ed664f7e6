"""The event store's tables (SQLAlchemy Core). Alembic migrations create them.

events           one row per event, insert-only (triggers refuse UPDATE and DELETE)
event_pending    committed events not yet given a global position (a work queue)
event_log        position -> event: the dense global order, insert-only
idempotency_keys first result of a command retried with the same key
patient_identities  name, date of birth, MRN by patient key: never in an event
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

RowId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")

events = Table(
    "events",
    metadata,
    Column("row_id", RowId, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("stream_id", String(64), nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("actor_id", String(64), nullable=False),
    Column("actor_role", String(32), nullable=False),
    Column("correlation_id", String(36), nullable=False),
    Column("causation_id", String(36), nullable=False),
    Column("policy_id", String(32)),
    Column("policy_version", String(32)),
    Column("data", Json, nullable=False),
    #: The canonical wire bytes with "position": null (continuum_events.wire); the position is
    #: spliced in when read by position. Null for rows written before revision 0003.
    Column("body", Text),
    UniqueConstraint("stream_id", "stream_version", name="uq_events_stream_version"),
)

event_pending = Table(
    "event_pending",
    metadata,
    Column("row_id", RowId, ForeignKey("events.row_id"), primary_key=True, autoincrement=False),
)

event_log = Table(
    "event_log",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("row_id", RowId, ForeignKey("events.row_id"), nullable=False, unique=True),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("request_hash", String(64)),
    Column("stream_id", String(64), nullable=False),
    Column("event_ids", JSON, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

patient_identities = Table(
    "patient_identities",
    metadata,
    Column("patient_key", String(64), primary_key=True),
    Column("given_name", String(100), nullable=False),
    Column("family_name", String(100), nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("mrn", String(32), unique=True),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
