"""The store's fast wire path produces exactly the bytes of the validated model."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from sqlalchemy import Engine

from continuum.adapters.sql.store import SqlEventStore
from continuum.application.service import PatientService
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from continuum_events import canonical_json, parse_event_json
from tests.support import FixedClock


@pytest.mark.parametrize("backend", ["sqlite_engine", "pg_engine"])
def test_wire_bytes_from_rows_equal_the_models_canonical_json(
    request: pytest.FixtureRequest, backend: str, policies: PolicyRegistry
) -> None:
    engine: Engine = request.getfixturevalue(backend)
    store = SqlEventStore(engine)
    clock = FixedClock(dt.datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=25, days=60, seed=4)

    models = list(store.iter_all())
    wires = list(store.iter_wire(batch=97))
    assert len(models) == len(wires) > 200
    event_types = {m.event_type for m in models}
    assert {"PatientAdmitted", "ReassessmentRecorded", "LevelTransitioned"} <= event_types
    for model, wire in zip(models, wires, strict=True):
        assert wire.value == canonical_json(model), model.event_type
        assert (wire.position, wire.event_id) == (model.position, str(model.event_id))
        assert parse_event_json(wire.value) == model
        assert json.loads(wire.value)["occurred_at"].endswith("Z")


@pytest.mark.parametrize("backend", ["sqlite_engine", "pg_engine"])
def test_rows_without_stored_body_are_rebuilt_from_their_columns(
    request: pytest.FixtureRequest, backend: str, policies: PolicyRegistry
) -> None:
    """Events written before migration 0003 have no stored body: the fast path rebuilds it."""
    from sqlalchemy import insert

    from continuum.adapters.sql import tables
    from continuum.adapters.sql.store import _to_row

    engine: Engine = request.getfixturevalue(backend)
    store = SqlEventStore(engine)
    simulate_cohort(PatientService(store, policies, FixedClock()), patients=3, days=30, seed=8)
    donor = next(iter(store.iter_all()))
    legacy = donor.model_copy(
        update={"event_id": uuid.uuid4(), "stream_id": "pk-" + "c" * 20, "position": None}
    )
    with engine.begin() as conn:
        row = {**_to_row(legacy), "body": None}
        row_id = conn.execute(
            insert(tables.events).values(**row).returning(tables.events.c.row_id)
        ).scalar_one()
        head = store.head_position()
        conn.execute(insert(tables.event_log).values(position=head + 1, row_id=row_id))
    wires = store.read_wire(head - 1, 10)
    assert [w.position for w in wires] == [head, head + 1]
    stored = store.read_all(head, 1)[0]
    assert wires[-1].value == canonical_json(stored)
    assert wires[-1].value == canonical_json(legacy.model_copy(update={"position": head + 1}))
