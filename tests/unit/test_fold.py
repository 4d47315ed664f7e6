"""The continuum fold on its own (no database): voids undo placement changes as the domain's
fold does, flags that the service's guards make unreachable still work on recorded events, and
an unknown policy version leaves policy-derived flags empty instead of guessing."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from continuum.adapters.memory import InMemoryEventStore
from continuum.application.service import PatientService
from continuum.domain import commands as c
from continuum.domain.patient import replay
from continuum.domain.policy import PolicyRegistry
from continuum_events import (
    AgeGroup,
    DischargeReason,
    Disposition,
    PatientEvent,
    VoidReason,
    canonical_json,
)
from continuum_projections.fold import COLUMNS, Changes, ContinuumFold, PatientFold, decode
from continuum_projections.policyview import PolicyView, PolicyViews
from tests.support import FixedClock, assessment, day


def wire(store: InMemoryEventStore, key: str) -> list[dict[str, Any]]:
    return [decode(canonical_json(e)) for e in store.read_stream(key)]


@pytest.fixture
def env(policies: PolicyRegistry) -> tuple[InMemoryEventStore, PatientService, FixedClock]:
    store = InMemoryEventStore()
    clock = FixedClock(day(100))
    return store, PatientService(store, policies, clock), clock


def admit(service: PatientService, n: float = 0) -> str:
    result = service.handle(
        c.Admit(
            occurred_at=day(n),
            level="3.5",
            site="s1",
            age_group=AgeGroup.ADULT,
            assessment=assessment("001040"),
        )
    )
    return result.stream_id


def discharge(service: PatientService, key: str, n: float) -> PatientEvent:
    """Discharge the patient on day `n`, completed, home; the recorded event."""
    return service.handle(
        c.Discharge(
            patient_key=key,
            occurred_at=day(n),
            reason=DischargeReason.COMPLETED,
            disposition=Disposition.HOME,
        )
    ).events[0]


def fold_all(policies: PolicyRegistry, events: list[dict[str, Any]]) -> ContinuumFold:
    fold = ContinuumFold(PolicyViews(policies))
    for event in events:
        assert fold.apply(event)
    return fold


def test_void_of_a_discharge_reopens_the_stay_and_the_episode(
    env: Any, policies: PolicyRegistry
) -> None:
    store, service, _ = env
    key = admit(service)
    discharged = discharge(service, key, 5)
    service.handle(
        c.VoidEvent(
            patient_key=key,
            event_id=discharged.event_id,
            reason=VoidReason.ENTERED_IN_ERROR,
            occurred_at=day(6),
        )
    )
    events = wire(store, key)
    fold = fold_all(policies, events)
    patient = fold.patients[key]
    domain = replay(key, store.read_stream(key), policies)
    assert patient.state == domain.state == "3.5"
    changes = fold.changes
    stay = changes.inserted("stays")[str(events[0]["event_id"])]
    assert stay["ended_at"] is None  # closed by the discharge, reopened by its void
    episode = changes.inserted("episodes")[str(events[0]["data"]["episode_id"])]
    assert episode["discharged_at"] is None
    assert [d["delta"] for d in changes.deltas] == [1, -1, 1]


def _admitted_in_error(store: InMemoryEventStore, service: PatientService) -> tuple[str, Any]:
    """A patient admitted, then the admission voided: (key, the admission event)."""
    key = admit(service)
    first = store.read_stream(key)[0]
    service.handle(
        c.VoidEvent(
            patient_key=key,
            event_id=first.event_id,
            reason=VoidReason.WRONG_PATIENT,
            occurred_at=day(1),
        )
    )
    return key, first


def test_void_of_an_admission_empties_the_census_and_voids_the_episode(
    env: Any, policies: PolicyRegistry
) -> None:
    store, service, _ = env
    key, first = _admitted_in_error(store, service)
    fold = fold_all(policies, wire(store, key))
    patient = fold.patients[key]
    assert patient.placement is None
    assert patient.row()["active"] is False
    assert fold.changes.inserted("episodes")[str(first.data.episode_id)]["voided"] is True
    assert fold.changes.inserted("stays")[str(first.event_id)]["voided"] is True
    assert sum(d["delta"] for d in fold.changes.deltas) == 0


def test_stale_reassessment_flag_on_a_recorded_transition(
    env: Any, policies: PolicyRegistry
) -> None:
    """The service refuses stale moves; a record from another path (or an edited log that the
    hash chain would catch) is still flagged by the audit trail."""
    store, service, _ = env
    key = admit(service)
    service.handle(
        c.RecordReassessment(
            patient_key=key, occurred_at=day(10), assessment=assessment("000020", 12)
        )
    )
    service.handle(c.Transition(patient_key=key, occurred_at=day(12), to_level="2.1"))
    events = wire(store, key)
    events[-1]["data"]["reassessment_age_days"] = 9.5
    fold = fold_all(policies, events)
    row = fold.changes.inserted("transitions")[str(events[-1]["event_id"])]
    assert row["flag_stale_reassessment"] is True
    assert row["window_days"] == 7
    # The same event judged by a policy version this service does not have: no guessing.
    events[-1]["policy"] = {"id": "asam-3", "version": "1999.1"}
    unknown = fold_all(policies, events)
    row = unknown.changes.inserted("transitions")[str(events[-1]["event_id"])]
    assert row["window_days"] is None
    assert row["flag_stale_reassessment"] is False
    assert row["skipped_levels"] is None


def test_fold_state_round_trips_through_json(env: Any, policies: PolicyRegistry) -> None:
    store, service, _ = env
    key = admit(service)
    service.handle(
        c.RecordAttendance(patient_key=key, occurred_at=day(1), service_date=day(1).date(), hours=3)
    )
    fold = fold_all(policies, wire(store, key))
    patient = fold.patients[key]
    again = PatientFold.from_json(key, patient.to_json())
    assert again.to_json() == patient.to_json()
    assert again.stored is True
    broken = patient.to_json().replace(b'"v":2', b'"v":99')
    with pytest.raises(ValueError, match="version 99, this code reads 2: rebuild"):
        PatientFold.from_json(key, broken)


def test_the_last_assessment_is_the_latest_by_time_not_by_text() -> None:
    patient = PatientFold(key="pk-x")
    patient.assessed = {"a": "2026-03-01T10:00:13Z", "b": "2026-03-01T10:00:13.500000Z"}
    assert patient.row()["last_assessed_at"] == "2026-03-01T10:00:13.500000Z"


@pytest.mark.parametrize(
    ("a", "b", "skipped"),
    [
        ("3.5", "2.1", ["3.3", "3.1", "2.5"]),
        ("2.1", "3.5", ["3.3", "3.1", "2.5"]),
        ("2.1", "1", []),
        ("3.7-WM", "2.1", []),  # out of withdrawal management: nothing skipped
        ("4", "aftercare", ["3.7", "3.5", "3.3", "3.1", "2.5", "2.1", "1", "OTP", "0.5"]),
    ],
)
def test_skipped_levels(policies: PolicyRegistry, a: str, b: str, skipped: list[str]) -> None:
    view = PolicyView.of(policies.default)
    got = view.skipped(a, b)
    assert sorted(got) == sorted(skipped)
    assert [view.rank(code) for code in got] == sorted(
        (view.rank(code) or 0 for code in got), reverse=True
    )


def test_times_are_utc(env: Any, policies: PolicyRegistry) -> None:
    store, service, _ = env
    key = admit(service)
    fold = fold_all(policies, wire(store, key))
    stay = next(iter(fold.changes.inserted("stays").values()))
    assert stay["started_at"] == "2026-01-05T09:00:00Z"  # the event's own UTC text
    assert dt.datetime.fromisoformat(stay["started_at"]) == day(0)


def test_a_void_beyond_the_undo_stack_is_refused_clearly(
    env: Any, policies: PolicyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from continuum_projections import fold as fold_module

    monkeypatch.setattr(fold_module, "MAX_UNDO", 1)
    store, service, _ = env
    key = admit(service)
    service.handle(
        c.RecordReassessment(
            patient_key=key, occurred_at=day(3), assessment=assessment("000020", 12)
        )
    )
    moved = service.handle(c.Transition(patient_key=key, occurred_at=day(4), to_level="2.1"))
    admitted = store.read_stream(key)[0]
    for n, target in ((5, moved.events[0].event_id), (6, admitted.event_id)):
        service.handle(
            c.VoidEvent(
                patient_key=key,
                event_id=target,
                reason=VoidReason.ENTERED_IN_ERROR,
                occurred_at=day(n),
            )
        )
    events = wire(store, key)
    fold = ContinuumFold(PolicyViews(policies))
    for event in events[:-1]:
        fold.apply(event)
    assert fold.patients[key].state == "3.5"  # the move's void was undone from the stack
    with pytest.raises(fold_module.UndoLimit, match="older than the 1 this projection keeps"):
        fold.apply(events[-1])
    monkeypatch.setattr(fold_module, "MAX_UNDO", 6)
    assert fold_all(policies, events).patients[key].placement is None


def _journey(service: PatientService, key: str) -> None:
    service.handle(
        c.RecordReassessment(
            patient_key=key, occurred_at=day(10), assessment=assessment("000020", 12)
        )
    )
    service.handle(c.Transition(patient_key=key, occurred_at=day(12), to_level="2.1"))


def test_a_deferring_fold_writes_each_stay_and_episode_once_final(
    env: Any, policies: PolicyRegistry
) -> None:
    """Taken after every event, a deferring fold never patches a row: a stay is inserted when
    it closes, the episode at discharge, and the patient is saved only once out of care."""
    store, service, _ = env
    key = admit(service)
    _journey(service, key)
    discharge(service, key, 20)
    events = wire(store, key)
    fold = ContinuumFold(PolicyViews(policies), defer=True)
    inserted: dict[str, list[dict[str, Any]]] = {}
    saved: list[int] = []
    for event in events:
        assert fold.apply(event)
        changes, touched = fold.take(complete=False)
        assert not changes.patches
        for table in changes.inserts:
            inserted.setdefault(table, []).extend(changes.inserted(table).values())
        saved.extend(p.version for p in touched)
    assert saved == [len(events)]  # once, after the discharge
    stays = inserted["stays"]
    assert [s["stay_id"] for s in stays] == [events[0]["event_id"], events[2]["event_id"]]
    assert all(s["ended_at"] is not None for s in stays)
    assert stays[1]["end_kind"] == "discharge"
    [episode] = inserted["episodes"]
    assert episode["discharged_at"] == events[-1]["occurred_at"]
    # The same log folded without deferring gives the same final rows.
    plain = fold_all(policies, events)
    assert list(plain.changes.inserted("stays").values()) == stays
    assert list(plain.changes.inserted("episodes").values()) == [episode]


def test_a_deferring_fold_holds_patients_in_care_until_a_complete_take(
    env: Any, policies: PolicyRegistry
) -> None:
    store, service, _ = env
    key = admit(service)
    _journey(service, key)
    fold = ContinuumFold(PolicyViews(policies), defer=True)
    for event in wire(store, key):
        fold.apply(event)
    changes, touched = fold.take(complete=False)
    assert touched == [] and key in fold.dirty
    assert list(changes.inserts["stays"]) == [str(store.read_stream(key)[0].event_id)]  # closed
    assert "episodes" not in changes.inserts and changes.deltas  # census deltas go at once
    changes, touched = fold.take(complete=True)
    assert [p.key for p in touched] == [key] and not fold.dirty
    [open_stay] = changes.inserted("stays").values()
    assert open_stay["level"] == "2.1" and open_stay["ended_at"] is None
    [episode] = changes.inserted("episodes").values()
    assert episode["discharged_at"] is None
    assert touched[0].pending_stay is None and touched[0].pending_episode is None


def test_a_void_of_a_deferred_admission_writes_the_voided_rows(
    env: Any, policies: PolicyRegistry
) -> None:
    store, service, _ = env
    key, first = _admitted_in_error(store, service)
    fold = ContinuumFold(PolicyViews(policies), defer=True)
    events = wire(store, key)
    fold.apply(events[0])
    assert fold.take(complete=False)[0].inserts == {}
    fold.apply(events[1])
    changes, touched = fold.take(complete=False)
    assert [p.key for p in touched] == [key]  # out of care again: saved
    assert changes.inserted("stays")[str(first.event_id)]["voided"] is True
    assert changes.inserted("episodes")[str(first.data.episode_id)]["voided"] is True


def test_inserted_rows_are_kept_as_values_in_the_read_model_tables_column_order() -> None:
    from continuum_projections.readmodel import ROW_TABLES

    assert set(COLUMNS) == set(ROW_TABLES)
    for name, table in ROW_TABLES.items():
        assert COLUMNS[name] == tuple(c.name for c in table.c)


def test_a_patch_of_a_row_inserted_in_the_same_batch_changes_its_values() -> None:
    changes = Changes()
    row = dict.fromkeys(COLUMNS["episodes"]) | {"episode_id": "e1", "voided": False}
    changes.insert("episodes", "e1", row)
    changes.patch("episodes", "e1", {"readmitted_at": "2026-03-01T00:00:00Z", "voided": True})
    changes.patch("episodes", "e2", {"voided": True})  # written earlier: an UPDATE
    [values] = changes.inserts["episodes"].values()
    index = COLUMNS["episodes"].index
    assert values[index("readmitted_at")] == "2026-03-01T00:00:00Z"
    assert values[index("voided")] is True and values[index("episode_id")] == "e1"
    assert changes.inserted("episodes")["e1"] == row | {
        "readmitted_at": "2026-03-01T00:00:00Z",
        "voided": True,
    }
    assert changes.patches == {"episodes": {"e2": {"voided": True}}}
    assert changes.rows == 2  # one insert, one patch; a patch of an inserted row is no new row
    with pytest.raises(KeyError):
        changes.insert("stays", "s1", {"stay_id": "s1"})  # a row without every column
