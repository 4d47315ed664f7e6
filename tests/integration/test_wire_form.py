"""The store's fast wire path produces exactly the bytes of the validated model."""

from __future__ import annotations

import datetime as dt
import json

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
