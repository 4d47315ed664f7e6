"""The FHIR R4 export (continuum.adapters.fhir): valid R4B JSON, the timeline's facts intact,
voids honoured, no identity.

Facts are read back from the parsed JSON by the source ids in each resource's identifier (never
by the export's own resource ids) and compared with two independent folds of the same events:
the projection's (`continuum_projections.fold`: stays, episodes, the transitions trail) and
the domain's (`continuum.domain.patient.replay`: episodes, current placement, assessments).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.episodeofcare import EpisodeOfCare
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.reference import Reference

from continuum.adapters.fhir import patient_bundle
from continuum.adapters.memory import InMemoryEventStore
from continuum.application.service import PatientService
from continuum.domain import commands as c
from continuum.domain.errors import UnknownPatient, UnknownPolicy
from continuum.domain.patient import replay
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from continuum_events import (
    AgeGroup,
    DischargeReason,
    Disposition,
    EventVoided,
    PatientAdmitted,
    PatientEvent,
    PatientReadmitted,
    PolicyRef,
    ReassessmentRecorded,
    VarianceReason,
    VoidReason,
    canonical_json,
)
from continuum_projections.fold import ContinuumFold, decode
from continuum_projections.policyview import PolicyViews
from tests.support import FixedClock, assessment, day

PATIENT_KEY = "urn:care-continuum:patient-key"
EPISODE_ID = "urn:care-continuum:episode-id"
EVENT_ID = "urn:care-continuum:event-id"
SITE = "urn:care-continuum:site"
STAY_ENTRY = "urn:care-continuum:stay-entry"
TEDS = "urn:care-continuum:teds-discharge-reason"
DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
OBSERVATION = "urn:care-continuum:observation"
POLICY = "urn:care-continuum:policy"
EXTENSION = "urn:care-continuum:fhir:extension:"
ERROR = "entered-in-error"

Rows = dict[str, dict[str, Any]]


# -- reading the bundle back ------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeFact:
    status: str
    start: dt.datetime
    end: dt.datetime | None
    reason: str | None
    disposition: str | None
    number: int


@dataclass(frozen=True)
class StayFact:
    status: str
    episode_id: str
    level: str
    site: str
    start: dt.datetime
    end: dt.datetime | None
    entry: str
    evidence: str
    disposition: str | None
    policy: tuple[str, str]


@dataclass(frozen=True)
class AssessmentFact:
    status: str
    time: dt.datetime
    ratings: dict[str, str]
    indicated: str
    hours: float | None
    encounter: str | None  # the opening event id of the stay it was made in


@dataclass
class Facts:
    patient_key: str
    episodes: dict[str, EpisodeFact]
    stays: dict[str, StayFact]
    assessments: dict[str, AssessmentFact]

    def valid_episodes(self) -> dict[str, EpisodeFact]:
        return {k: v for k, v in self.episodes.items() if v.status != ERROR}

    def valid_stays(self) -> dict[str, StayFact]:
        return {k: v for k, v in self.stays.items() if v.status != ERROR}

    def valid_assessments(self) -> dict[str, AssessmentFact]:
        return {k: v for k, v in self.assessments.items() if v.status != ERROR}


def round_trip(bundle: Bundle) -> tuple[str, Bundle]:
    """The bundle's JSON, and that JSON parsed back by fhir.resources (R4B)."""
    text = bundle.model_dump_json()
    parsed = Bundle.model_validate_json(text)
    assert parsed.model_dump_json() == text
    return text, parsed


def only(items: list[Any] | None) -> Any:
    assert items is not None
    assert len(items) == 1, items
    return items[0]


def code_of(concept: CodeableConcept | None, system: str) -> str:
    assert concept is not None
    codes = [c.code for c in concept.coding or [] if c.system == system]
    return cast(str, only(codes))


def identifier(ids: list[Identifier] | None, system: str) -> str:
    return cast(str, only([i.value for i in ids or [] if i.system == system]))


def extension(extensions: list[Extension] | None, name: str) -> Extension | None:
    found = [e for e in extensions or [] if e.url == EXTENSION + name]
    assert len(found) <= 1
    return found[0] if found else None


def read_back(parsed: Bundle) -> Facts:
    """The timeline's facts from a parsed bundle, keyed by the ids of the source events."""
    assert parsed.type == "collection"
    entries = parsed.entry or []
    urls = [e.fullUrl for e in entries]
    assert len(set(urls)) == len(urls), "fullUrl repeats"
    by_url = {e.fullUrl: e.resource for e in entries}

    def resolve(ref: Reference | None) -> Any:
        assert ref is not None and ref.reference is not None
        assert ref.reference in by_url, f"dangling reference {ref.reference}"
        return by_url[ref.reference]

    resources = [e.resource for e in entries]
    patients = [r for r in resources if isinstance(r, Patient)]
    patient = only(patients)
    facts = Facts(identifier(patient.identifier, PATIENT_KEY), {}, {}, {})
    for resource in resources:
        if isinstance(resource, EpisodeOfCare):
            assert resolve(resource.patient) is patient
            assert resource.period is not None and resource.period.start is not None
            reason = extension(resource.extension, "discharge-reason")
            disposition = extension(resource.extension, "discharge-disposition")
            number = extension(resource.extension, "episode-number")
            assert number is not None
            facts.episodes[identifier(resource.identifier, EPISODE_ID)] = EpisodeFact(
                status=cast(str, resource.status),
                start=resource.period.start,
                end=resource.period.end,
                reason=reason.valueCoding.code if reason and reason.valueCoding else None,
                disposition=(
                    disposition.valueCoding.code
                    if disposition and disposition.valueCoding
                    else None
                ),
                number=cast(int, number.valuePositiveInt),
            )
    for resource in resources:
        if isinstance(resource, Encounter):
            assert resolve(resource.subject) is patient
            episode = resolve(only(resource.episodeOfCare))
            assert isinstance(episode, EpisodeOfCare)
            evidence = resolve(only(resource.reasonReference))
            assert isinstance(evidence, Observation)
            assert resource.serviceType is not None and resource.period is not None
            level = only(resource.serviceType.coding)
            provider = resource.serviceProvider
            assert provider is not None and provider.identifier is not None
            assert provider.identifier.system == SITE
            policy = extension(resource.extension, "policy")
            assert policy is not None and policy.valueCoding is not None
            assert policy.valueCoding.system == POLICY
            hospitalization = resource.hospitalization
            facts.stays[identifier(resource.identifier, EVENT_ID)] = StayFact(
                status=cast(str, resource.status),
                episode_id=identifier(episode.identifier, EPISODE_ID),
                level=level.code,
                site=cast(str, provider.identifier.value),
                start=cast(dt.datetime, resource.period.start),
                end=resource.period.end,
                entry=code_of(only(resource.type), STAY_ENTRY),
                evidence=identifier(evidence.identifier, EVENT_ID),
                disposition=(
                    code_of(hospitalization.dischargeDisposition, DISPOSITION)
                    if hospitalization is not None
                    else None
                ),
                policy=(cast(str, policy.valueCoding.code), cast(str, policy.valueCoding.version)),
            )
            assert resource.class_fhir.code in {"IMP", "NONAC", "AMB"}
    for resource in resources:
        if isinstance(resource, Observation):
            assert resolve(resource.subject) is patient
            assert code_of(resource.code, OBSERVATION) == "level-of-care-assessment"
            ratings: dict[str, str] = {}
            indicated: list[str] = []
            hours: list[float] = []
            for component in resource.component or []:
                coding = only(component.code.coding)
                if coding.system.endswith(":dimension"):
                    value = only(cast(CodeableConcept, component.valueCodeableConcept).coding)
                    assert value.system.endswith(":rating")
                    ratings[coding.code] = value.code
                elif (coding.system, coding.code) == (OBSERVATION, "indicated-level"):
                    value = only(cast(CodeableConcept, component.valueCodeableConcept).coding)
                    indicated.append(value.code)
                elif (coding.system, coding.code) == (OBSERVATION, "hours-scheduled"):
                    assert component.valueQuantity is not None
                    hours.append(float(cast(float, component.valueQuantity.value)))
            stay = resolve(resource.encounter) if resource.encounter is not None else None
            facts.assessments[identifier(resource.identifier, EVENT_ID)] = AssessmentFact(
                status=cast(str, resource.status),
                time=cast(dt.datetime, resource.effectiveDateTime),
                ratings=ratings,
                indicated=only(indicated),
                hours=hours[0] if hours else None,
                encounter=identifier(stay.identifier, EVENT_ID) if stay is not None else None,
            )
    return facts


# -- what the folds say -----------------------------------------------------------------------


def when(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value is not None else None


def projection_rows(events: list[PatientEvent], policies: PolicyRegistry) -> dict[str, Rows]:
    """The read-model rows the projection's fold makes of these events (stays, episodes,
    transitions), with every patch applied."""
    fold = ContinuumFold(PolicyViews(policies))
    for event in events:
        assert fold.apply(decode(canonical_json(event)))
    changes, _ = fold.take()
    assert not changes.patches.get("stays") and not changes.patches.get("episodes")
    return {table: changes.inserted(table) for table in changes.inserts}


def check_against_the_folds(
    key: str, events: list[PatientEvent], policies: PolicyRegistry, facts: Facts
) -> None:
    assert facts.patient_key == key
    rows = projection_rows(events, policies)
    episodes = rows.get("episodes", {})
    check_episodes(facts, episodes)
    check_stays(facts, rows.get("stays", {}), episodes, rows.get("transitions", {}))
    check_assessments(facts, events, episodes)

    # The domain's fold: the same episodes stand, the current placement is the one open stay,
    # and its current assessments are among the valid ones, unchanged.
    state = replay(key, events, policies)
    assert set(facts.valid_episodes()) == {str(e.episode_id) for e in state.episodes}
    open_stays = [s for s in facts.valid_stays().values() if s.end is None]
    if state.is_active(policies.default.terminal_state):
        stay = only(open_stays)
        assert (stay.level, stay.site, stay.start) == (state.state, state.site, state.placed_at)
    else:
        assert open_stays == []
    valid_assessments = facts.valid_assessments()
    for event_id, record in state.assessments.items():
        fact = valid_assessments[str(event_id)]
        assert (fact.time, fact.ratings, fact.indicated) == (
            record.occurred_at,
            record.ratings,
            record.indicated_level,
        )


def check_episodes(facts: Facts, episodes: Rows) -> None:
    """One EpisodeOfCare per episode row of the projection; voided ones entered-in-error."""
    assert set(facts.episodes) == set(episodes)
    for episode_id, row in episodes.items():
        fact = facts.episodes[episode_id]
        assert fact.start == when(row["admitted_at"])
        assert fact.number == row["episode_number"]
        if row["voided"]:
            assert fact.status == ERROR
            continue
        assert fact.status == ("finished" if row["discharged_at"] else "active")
        assert fact.end == when(row["discharged_at"])
        assert fact.reason == row["discharge_reason"]
        assert fact.disposition == row["discharge_disposition"]


def check_stays(facts: Facts, stays: Rows, episodes: Rows, trail: Rows) -> None:
    """One Encounter per stay row of the projection; voided ones entered-in-error."""
    assert set(facts.stays) == set(stays)
    for stay_id, row in stays.items():
        fact = facts.stays[stay_id]
        assert (fact.episode_id, fact.level, fact.site, fact.start, fact.entry) == (
            row["episode_id"],
            row["level"],
            row["site"],
            when(row["started_at"]),
            row["start_kind"],
        )
        move = trail.get(stay_id)
        assert fact.evidence == (move["reassessment_event_id"] if move else stay_id)
        if move is not None:
            assert fact.policy == (move["policy_id"], move["policy_version"])
        if row["voided"]:
            assert fact.status == ERROR
            continue
        assert fact.status == ("finished" if row["ended_at"] else "in-progress")
        assert fact.end == when(row["ended_at"])
        if row["end_kind"] == "discharge":
            assert fact.disposition == episodes[row["episode_id"]]["discharge_disposition"]
        else:
            assert fact.disposition is None


def check_assessments(facts: Facts, events: list[PatientEvent], episodes: Rows) -> None:
    """One Observation per assessment; valid unless voided or made in a voided episode."""
    voided = {str(e.data.voided_event_id) for e in events if isinstance(e, EventVoided)}
    assessed = [
        e
        for e in events
        if isinstance(e, PatientAdmitted | PatientReadmitted | ReassessmentRecorded)
    ]
    assert set(facts.assessments) == {str(e.event_id) for e in assessed}
    for event in assessed:
        fact = facts.assessments[str(event.event_id)]
        given = event.data.assessment
        assert (fact.time, fact.ratings, fact.indicated, fact.hours) == (
            event.occurred_at,
            dict(given.ratings),
            given.indicated_level,
            given.hours_scheduled,
        )
        episode_voided = episodes[str(event.data.episode_id)]["voided"]
        valid = str(event.event_id) not in voided and not episode_voided
        assert fact.status == ("final" if valid else ERROR)
        if valid:  # made in a standing stay of its own episode, begun by then
            assert fact.encounter is not None
            stay = facts.stays[fact.encounter]
            assert stay.status != ERROR and stay.episode_id == str(event.data.episode_id)
            assert stay.start <= fact.time


def export(key: str, events: list[PatientEvent], policies: PolicyRegistry) -> tuple[str, Facts]:
    text, parsed = round_trip(patient_bundle(key, events, policies))
    return text, read_back(parsed)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def store() -> InMemoryEventStore:
    return InMemoryEventStore()


@pytest.fixture
def service(store: InMemoryEventStore, policies: PolicyRegistry) -> PatientService:
    return PatientService(store, policies, clock=FixedClock())


def admit(service: PatientService, level: str = "3.5", ratings: str = "001040", **kw: Any) -> str:
    command = c.Admit(
        level=level,
        site=kw.pop("site", "north"),
        age_group=AgeGroup.ADULT,
        assessment=assessment(ratings, kw.pop("hours", None)),
        occurred_at=kw.pop("occurred_at", day(0)),
        **kw,
    )
    return service.handle(command).stream_id


def reassess(
    service: PatientService, key: str, ratings: str, hours: float | None, at: float
) -> UUID:
    result = service.handle(
        c.RecordReassessment(
            patient_key=key, assessment=assessment(ratings, hours), occurred_at=day(at)
        )
    )
    return result.events[0].event_id


def move(service: PatientService, key: str, level: str, at: float, **kw: Any) -> UUID:
    result = service.handle(
        c.Transition(patient_key=key, to_level=level, occurred_at=day(at), **kw)
    )
    return result.events[0].event_id


def discharge(
    service: PatientService, key: str, at: float, reason: DischargeReason, disposition: Disposition
) -> UUID:
    result = service.handle(
        c.Discharge(patient_key=key, reason=reason, disposition=disposition, occurred_at=day(at))
    )
    return result.events[0].event_id


def void(service: PatientService, key: str, event_id: UUID) -> None:
    service.handle(
        c.VoidEvent(patient_key=key, event_id=event_id, reason=VoidReason.ENTERED_IN_ERROR)
    )


# -- (1) + (2): a simulated cohort, with voids ------------------------------------------------


def test_every_bundle_of_a_cohort_is_valid_r4_and_keeps_the_timeline(
    policies: PolicyRegistry,
) -> None:
    store = InMemoryEventStore()
    service = PatientService(
        store, policies, clock=FixedClock(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    )
    report = simulate_cohort(service, patients=40, days=180, seed=11)
    keys = sorted(store.stream_ids())
    assert len(keys) == 40
    # Void some: the latest placement change (once or twice), or the latest reassessment.
    voids = undone = 0  # undone: voids that leave a resource entered-in-error (not discharges)
    for i, key in enumerate(keys):
        for _ in range({0: 1, 1: 2}.get(i % 4, 0)):
            state = service.load(key)
            if state.changes:
                void(service, key, state.changes[-1].event_id)
                voids += 1
                undone += state.changes[-1].event_type != "PatientDischarged"
        if i % 4 == 2:
            state = service.load(key)
            reassessed = [
                e
                for e in store.read_stream(key)
                if isinstance(e, ReassessmentRecorded) and e.event_id in state.assessments
            ]
            if reassessed:
                void(service, key, reassessed[-1].event_id)
                voids += 1
                undone += 1
    assert (
        voids >= 20 and undone >= 10 and report.readmissions > 0
    )  # the cohort exercises what is tested

    entered_in_error = readmitted = 0
    for key in keys:
        events = store.read_stream(key)
        _, facts = export(key, events, policies)
        check_against_the_folds(key, events, policies, facts)
        entered_in_error += sum(
            f.status == ERROR
            for group in (facts.episodes, facts.stays, facts.assessments)
            for f in group.values()
        )
        readmitted += len(facts.valid_episodes()) > 1
    assert entered_in_error >= undone
    assert readmitted > 0


def test_the_export_is_a_function_of_the_events(
    service: PatientService, store: InMemoryEventStore, policies: PolicyRegistry
) -> None:
    key = admit(service)
    reassess(service, key, "020000", 12, 3)
    move(service, key, "2.1", 4)
    events = store.read_stream(key)
    first, _ = round_trip(patient_bundle(key, events, policies))
    again, _ = round_trip(patient_bundle(key, list(events), policies))
    assert first == again  # resource ids are stable: a later export updates the same resources
    stamped = patient_bundle(key, events, policies, timestamp=day(10))
    assert stamped.timestamp == day(10)


# -- (3) voids ---------------------------------------------------------------------------------


def test_voided_placements_and_assessments_are_entered_in_error(
    service: PatientService, store: InMemoryEventStore, policies: PolicyRegistry
) -> None:
    key = admit(service, "3.5", "001040", site="north")
    admitted = store.read_stream(key)[0].event_id
    r1 = reassess(service, key, "020000", 12, 6)  # indicates 2.1
    t1 = move(service, key, "2.1", 7)
    r2 = reassess(service, key, "000300", 24, 12)  # indicates 2.5
    t2 = move(service, key, "2.5", 13, site="south")
    void(service, key, t2)  # back to 2.1 at north, open again
    void(service, key, r2)
    r3 = reassess(service, key, "001000", 4, 20)  # indicates 1
    t3 = move(service, key, "1", 21)
    d1 = discharge(service, key, 30, DischargeReason.COMPLETED, Disposition.HOME)
    void(service, key, d1)  # back in care at level 1
    discharge(service, key, 31, DischargeReason.DROPPED_OUT, Disposition.LEFT_AGAINST_ADVICE)
    readmitted = service.handle(
        c.Readmit(
            patient_key=key,
            level="3.5",
            site="east",
            assessment=assessment("001040"),
            occurred_at=day(40),
        )
    ).events[0]
    assert isinstance(readmitted, PatientReadmitted)
    void(service, key, readmitted.event_id)

    events = store.read_stream(key)
    _, facts = export(key, events, policies)
    check_against_the_folds(key, events, policies, facts)

    first = str(store.read_stream(key)[0].data.episode_id)
    second = str(readmitted.data.episode_id)
    assert facts.episodes[first] == EpisodeFact(
        "finished", day(0), day(31), "dropped_out", "aadvice", 1
    )
    assert facts.episodes[second].status == ERROR
    stays = {k: (s.status, s.level, s.site, s.start, s.end) for k, s in facts.stays.items()}
    assert stays == {
        str(admitted): ("finished", "3.5", "north", day(0), day(7)),
        str(t1): ("finished", "2.1", "north", day(7), day(21)),
        str(t2): (ERROR, "2.5", "south", day(13), None),
        str(t3): ("finished", "1", "north", day(21), day(31)),
        str(readmitted.event_id): (ERROR, "3.5", "east", day(40), None),
    }
    assert facts.stays[str(t3)].disposition == "aadvice"  # the voided discharge said "home"
    assert facts.stays[str(t1)].evidence == str(r1)
    assert facts.stays[str(t2)].evidence == str(r2)  # what the voided move rested on
    assert facts.stays[str(t3)].entry == "step_down"
    status = {k: a.status for k, a in facts.assessments.items()}
    assert status == {
        str(admitted): "final",
        str(r1): "final",
        str(r2): ERROR,
        str(r3): "final",
        str(readmitted.event_id): ERROR,
    }
    assert facts.assessments[str(r3)].encounter == str(t1)  # made at 2.1, before the move to 1
    assert facts.assessments[str(r1)].encounter == str(admitted)


def test_an_admission_voided_and_made_again(
    service: PatientService, store: InMemoryEventStore, policies: PolicyRegistry
) -> None:
    key = admit(service, "3.5", "001040")
    wrong = store.read_stream(key)[0]
    assert isinstance(wrong, PatientAdmitted)
    void(service, key, wrong.event_id)
    admit(service, "2.1", "020000", hours=12, patient_key=key, occurred_at=day(0.5))
    events = store.read_stream(key)
    _, facts = export(key, events, policies)
    check_against_the_folds(key, events, policies, facts)
    assert facts.episodes[str(wrong.data.episode_id)].status == ERROR
    assert facts.stays[str(wrong.event_id)].status == ERROR
    assert facts.assessments[str(wrong.event_id)].status == ERROR
    (episode,) = facts.valid_episodes().values()
    (stay,) = facts.valid_stays().values()
    assert (episode.status, episode.start, stay.level, stay.status) == (
        "active",
        day(0.5),
        "2.1",
        "in-progress",
    )


# -- (4) identity ---------------------------------------------------------------------------


def test_identity_never_reaches_the_bundle(
    service: PatientService, store: InMemoryEventStore, policies: PolicyRegistry
) -> None:
    who = c.Identity(
        given_name="Zebulon",
        family_name="Quarrington-Okafor",
        birth_date=dt.date(1971, 3, 14),
        mrn="MRN-ZQ-770312",
    )
    key = admit(service, identity=who)
    assert store.identity(key) == who  # the identity was recorded, apart from the events
    reassess(service, key, "020000", 12, 3)
    move(service, key, "2.1", 4)
    discharge(service, key, 20, DischargeReason.COMPLETED, Disposition.HOME)
    text, parsed = round_trip(patient_bundle(key, store.read_stream(key), policies))
    for secret in ("Zebulon", "Quarrington", "Okafor", "1971-03-14", "MRN-ZQ-770312", "770312"):
        assert secret.lower() not in text.lower()
    patient = only([e.resource for e in parsed.entry or [] if isinstance(e.resource, Patient)])
    body = json.loads(patient.model_dump_json())
    assert set(body) == {"resourceType", "id", "identifier"}
    assert body["identifier"] == [{"system": PATIENT_KEY, "value": key}]


# -- (5) readmission ------------------------------------------------------------------------


def test_a_readmission_is_a_second_episode_of_care(
    service: PatientService, store: InMemoryEventStore, policies: PolicyRegistry
) -> None:
    key = admit(service, "3.5", "001040", site="north")
    discharge(service, key, 10, DischargeReason.TRANSFERRED, Disposition.OTHER_HEALTHCARE_FACILITY)
    service.handle(
        c.Readmit(
            patient_key=key,
            level="2.1",
            site="south",
            assessment=assessment("020000", 12),
            occurred_at=day(25),
        )
    )
    events = store.read_stream(key)
    _, parsed = round_trip(patient_bundle(key, events, policies))
    facts = read_back(parsed)
    check_against_the_folds(key, events, policies, facts)
    episodes = sorted(facts.episodes.values(), key=lambda e: e.start)
    assert episodes == [
        EpisodeFact("finished", day(0), day(10), "transferred", "other-hcf", 1),
        EpisodeFact("active", day(25), None, None, None, 2),
    ]
    by_episode = {s.episode_id: (s.level, s.site, s.entry) for s in facts.stays.values()}
    first, second = (
        e.data.episode_id for e in events if isinstance(e, PatientAdmitted | PatientReadmitted)
    )
    assert by_episode == {
        str(first): ("3.5", "north", "admission"),
        str(second): ("2.1", "south", "readmission"),
    }
    (readmission,) = [
        e.resource
        for e in parsed.entry or []
        if isinstance(e.resource, EpisodeOfCare) and e.resource.status == "active"
    ]
    previous = extension(readmission.extension, "previous-episode")
    assert previous is not None and previous.valueReference is not None
    (earlier,) = [e for e in parsed.entry or [] if e.fullUrl == previous.valueReference.reference]
    assert isinstance(earlier.resource, EpisodeOfCare)
    assert identifier(earlier.resource.identifier, EPISODE_ID) == str(first)


# -- codes and refusals -----------------------------------------------------------------------


def test_levels_are_coded_in_the_policy_code_system_with_its_names(
    service: PatientService, store: InMemoryEventStore, policies: PolicyRegistry
) -> None:
    key = admit(service, "3.5", "001040", site="north")
    reassess(service, key, "020000", 12, 3)
    move(service, key, "2.1", 4)
    _, parsed = round_trip(patient_bundle(key, store.read_stream(key), policies))
    asam3 = policies.get("asam-3", "2026.1")
    encounters = [e.resource for e in parsed.entry or [] if isinstance(e.resource, Encounter)]
    seen = []
    for encounter in encounters:
        assert encounter.serviceType is not None
        coding = only(encounter.serviceType.coding)
        assert (coding.system, coding.version) == (asam3.code_system, "2026.1")
        assert coding.display == asam3.level(coding.code).name
        assert encounter.class_fhir.code == asam3.level(coding.code).encounter_class
        seen.append((coding.code, encounter.class_fhir.code))
    assert sorted(seen) == [("2.1", "AMB"), ("3.5", "NONAC")]
    observations = [e.resource for e in parsed.entry or [] if isinstance(e.resource, Observation)]
    for observation in observations:
        dimensions = [
            only(comp.code.coding)
            for comp in observation.component or []
            if only(comp.code.coding).system == "urn:care-continuum:policy:asam-3:dimension"
        ]
        assert [d.code for d in dimensions] == ["1", "2", "3", "4", "5", "6"]
        assert {d.version for d in dimensions} == {"2026.1"}
        policy = extension(observation.extension, "policy")
        assert policy is not None and policy.valueCoding is not None
        assert (policy.valueCoding.code, policy.valueCoding.version) == ("asam-3", "2026.1")


def test_variance_authorization_and_program_travel_with_the_stay(
    service: PatientService, store: InMemoryEventStore, policies: PolicyRegistry
) -> None:
    key = admit(
        service,
        "3.7",
        "001040",  # indicates 3.5: placed at 3.7 for want of a 3.5 bed
        variance_reason=VarianceReason.NO_SLOT,
        authorization_ref="auth-31",
        program="women",
    )
    _, parsed = round_trip(patient_bundle(key, store.read_stream(key), policies))
    (encounter,) = [e.resource for e in parsed.entry or [] if isinstance(e.resource, Encounter)]
    variance = extension(encounter.extension, "variance-reason")
    authorization = extension(encounter.extension, "authorization")
    program = extension(encounter.extension, "program")
    assert variance is not None and variance.valueCoding is not None
    assert (variance.valueCoding.system, variance.valueCoding.code) == (
        "urn:care-continuum:variance-reason",
        "no_slot",
    )
    assert authorization is not None and authorization.valueIdentifier is not None
    assert authorization.valueIdentifier.value == "auth-31"
    assert program is not None and program.valueIdentifier is not None
    assert program.valueIdentifier.value == "women"
    (observation,) = [e.resource for e in parsed.entry or [] if isinstance(e.resource, Observation)]
    indicated = [
        only(cast(CodeableConcept, comp.valueCodeableConcept).coding).code
        for comp in observation.component or []
        if only(comp.code.coding).code == "indicated-level"
    ]
    assert indicated == ["3.5"]


def test_refusals(
    service: PatientService, store: InMemoryEventStore, policies: PolicyRegistry
) -> None:
    with pytest.raises(UnknownPatient):
        patient_bundle("pk-" + "a" * 20, [], policies)
    key = admit(service)
    other = admit(service)
    with pytest.raises(ValueError, match="belongs to"):
        patient_bundle(key, store.read_stream(other), policies)
    unknown = [
        e.model_copy(update={"policy": PolicyRef(id="no-such-policy", version="1")})
        for e in store.read_stream(key)
    ]
    with pytest.raises(UnknownPolicy):
        patient_bundle(key, unknown, policies)
