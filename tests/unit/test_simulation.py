"""The synthetic cohort's journeys only move forward in time.

Seed 2 with 300 patients over a year once produced a refused move whose fix (a reassessment,
then the move 30 minutes later) landed after the patient's discharge: simulate_cohort stopped
with "journey went back in time"."""

from __future__ import annotations

import datetime as dt

from continuum.adapters.memory import InMemoryEventStore
from continuum.application.service import PatientService
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from tests.support import FixedClock


def test_a_fixed_move_never_lands_after_the_discharge(policies: PolicyRegistry) -> None:
    store = InMemoryEventStore()
    clock = FixedClock(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    report = simulate_cohort(PatientService(store, policies, clock), patients=300, days=365, seed=2)
    assert report.commands > 4_000
    for key in store.stream_ids():
        times = [e.occurred_at for e in store.read_stream(key)]
        assert times == sorted(times), key
