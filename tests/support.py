"""Helpers shared by the test suites: synthetic inputs, a controllable clock."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Engine, text

from continuum.adapters.memory import InMemoryEventStore
from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.service import CommandContext, PatientService
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum_events import Actor, PatientEvent
from continuum_projections.readmodel import ReadModel

T0 = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)

#: The fields the issue says every event carries, stored or exported.
ENVELOPE_FIELDS = {
    "event_id",
    "event_type",
    "schema_version",
    "stream_id",
    "stream_version",
    "position",
    "occurred_at",
    "recorded_at",
    "actor",
    "correlation_id",
    "causation_id",
    "policy",
    "data",
}


class FixedClock:
    """A clock the test moves by hand."""

    def __init__(self, now: dt.datetime = T0 + dt.timedelta(days=365)) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


def assessment(ratings: str | Sequence[str], hours: float | None = None) -> c.AssessmentInput:
    """`assessment("001040", 12)`: six dimension ratings as a string, hours per week."""
    return c.AssessmentInput(
        instrument="asam-ca",
        assessor_id="clin-7",
        ratings={str(i + 1): str(r) for i, r in enumerate(ratings)},
        hours_scheduled=hours,
    )


def day(n: float) -> dt.datetime:
    """Clinical time n days after T0."""
    return T0 + dt.timedelta(days=n)


@contextmanager
def fresh_pg_schema(
    url: str, *, migrate: bool = True, pool_size: int = 12, prefix: str = "t"
) -> Iterator[Engine]:
    """An engine whose tables live in a new PostgreSQL schema, dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_database_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_database_engine(url, schema=schema, pool_size=pool_size)
    try:
        if migrate:
            upgrade(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def open_rebuild_parts(
    url: str, store_schema: str, model_schema: str
) -> Iterator[tuple[SqlEventStore, ReadModel, PolicyRegistry]]:
    """A parallel rebuild's opener (`continuum_projections.parallel.Opener`, through
    functools.partial): the store in one PostgreSQL schema, the read model in another."""
    source = create_database_engine(url, schema=store_schema, pool_size=2)
    target = create_database_engine(url, schema=model_schema, pool_size=2)
    try:
        model = ReadModel(target)
        model.create()
        yield SqlEventStore(source), model, PolicyRegistry.bundled()
    finally:
        source.dispose()
        target.dispose()


def index_names(engine: Engine) -> set[str]:
    """Every index in the engine's database (its schema, on PostgreSQL)."""
    from sqlalchemy import inspect

    inspector = inspect(engine)
    return {str(i["name"]) for t in inspector.get_table_names() for i in inspector.get_indexes(t)}


def scratch_patient(
    policies: PolicyRegistry, attendances: int = 0, *, actor: Actor | None = None
) -> list[PatientEvent]:
    """Realistic events for one new patient, built by the service on a scratch store: an
    admission and `attendances` attendance records, unpositioned, ready to append to a store
    under test with `expected_version=0`."""
    scratch = InMemoryEventStore()
    service = PatientService(scratch, policies, clock=FixedClock())
    ctx = CommandContext(actor=actor) if actor else CommandContext()
    admission = c.Admit(
        level="3.5",
        site="site-a",
        age_group="adult",
        assessment=assessment("001040"),
        occurred_at=day(0),
    )
    pk = service.handle(admission, ctx).stream_id
    for i in range(attendances):
        attendance = c.RecordAttendance(
            patient_key=pk, service_date=day(i + 1).date(), hours=3, occurred_at=day(i + 1)
        )
        service.handle(attendance, ctx)
    return [e.model_copy(update={"position": None}) for e in scratch.read_stream(pk)]
