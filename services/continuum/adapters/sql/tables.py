"""The event store's tables (SQLAlchemy Core). Alembic migrations create them.

events           one row per event, insert-only (triggers refuse UPDATE and DELETE)
event_pending    committed events not yet given a global position (a work queue)
event_log        position -> event: the dense global order, insert-only
idempotency_keys first result of a command retried with the same key
patient_identities  name, date of birth, MRN by patient key: never in an event
access_log       every read of patient-level data (who, role, what, when, purpose), insert-only
disclosures      every message disclosed to an organization under a consent, insert-only
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

#: The hash chain over event_log (revision 0004_hash_chain), insert-only: position -> the
#: event sealed there and chain_hash(previous, wire bytes) (continuum_events.chain).
log_hashes = Table(
    "log_hashes",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(36), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("sealed_at", DateTime(timezone=True), nullable=False),
)

#: Every access to patient-level data, insert-only (revision 0005_access_log).
access_log = Table(
    "access_log",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("token_id", String(64)),
    Column("channel", String(16), nullable=False),
    Column("action", String(64), nullable=False),
    Column("patient_key", String(64)),
    Column("resource", String(256), nullable=False),
    Column("purpose", String(16), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("request_id", String(64)),
    Column("records", Integer),
)

#: Every message disclosed to a recipient organization under a patient's consent, insert-only
#: (revision 0006_disclosures; application/disclosure.py).
disclosures = Table(
    "disclosures",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("org", String(63), nullable=False),
    Column("patient_key", String(64), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("consent_id", String(64), nullable=False),
    Column("topic", String(249), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("disclosed_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("topic", "partition", "offset", name="uq_disclosures_message"),
)
