"""One patient's record as a FHIR R4 Bundle (type "collection"), built with the R4B models.

Pure: events in, a `Bundle` out; no store, no clock, no settings. The caller reads the events
(`PatientService.history(key)` or `EventStore.read_stream(key)`), audits the export, and
serializes the result with `bundle.model_dump_json()`.

What is valid comes from the domain's own fold (`continuum.domain.patient.replay`), never from
rules re-derived here: the surviving placement changes (`PatientState.changes`) give the level
stays and discharges, the surviving episodes (`PatientState.episodes`) the episodes, and
`PatientState.voided` the voided events. Resources for what a void undid are kept, with status
`entered-in-error`, so a receiver that holds an earlier export (resource ids are derived from
event and episode ids, so they are stable) learns of the correction. docs/fhir.md has the
whole mapping.

R4B is wire-compatible with R4 for every resource and element used here (Patient,
EpisodeOfCare, Encounter, Observation, Bundle).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID, uuid5

from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.encounter import Encounter, EncounterHospitalization
from fhir.resources.R4B.episodeofcare import EpisodeOfCare
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.period import Period
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource

from continuum.domain.errors import UnknownPatient, UnknownPolicy
from continuum.domain.patient import PatientState, replay
from continuum.domain.policy import Level, Policy, PolicyRegistry
from continuum_events import (
    Assessment,
    DischargeReason,
    EventEnvelope,
    LevelTransitioned,
    PatientAdmitted,
    PatientDischarged,
    PatientEvent,
    PatientReadmitted,
    Placement,
    PolicyRef,
    ReassessmentRecorded,
)

# -- code systems and identifier systems of the service (docs/fhir.md lists them) -----------

PATIENT_KEY_SYSTEM = "urn:care-continuum:patient-key"
EVENT_ID_SYSTEM = "urn:care-continuum:event-id"
EPISODE_ID_SYSTEM = "urn:care-continuum:episode-id"
SITE_SYSTEM = "urn:care-continuum:site"
PROGRAM_SYSTEM = "urn:care-continuum:program"
AUTHORIZATION_SYSTEM = "urn:care-continuum:authorization"
ASSESSOR_SYSTEM = "urn:care-continuum:assessor"
SOURCE_RECORD_SYSTEM = "urn:care-continuum:source-record"
INSTRUMENT_SYSTEM = "urn:care-continuum:instrument"
INSTRUMENT_SCORE_SYSTEM = "urn:care-continuum:instrument-score"
OBSERVATION_SYSTEM = "urn:care-continuum:observation"
POLICY_SYSTEM = "urn:care-continuum:policy"
STAY_ENTRY_SYSTEM = "urn:care-continuum:stay-entry"
VARIANCE_REASON_SYSTEM = "urn:care-continuum:variance-reason"
TEDS_REASON_SYSTEM = "urn:care-continuum:teds-discharge-reason"
EXTENSION_BASE = "urn:care-continuum:fhir:extension:"

#: Resource ids are uuid5(RESOURCE_ID_NAMESPACE, "<resource type>/<source id>"): stable across
#: exports, and distinct although an admission event opens a stay and carries an assessment.
RESOURCE_ID_NAMESPACE = UUID("5b0c6a52-3f0e-4f57-9a43-3c1d2f6b8e17")

# -- HL7 code systems ---------------------------------------------------------------------

V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
DISCHARGE_DISPOSITION_SYSTEM = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
EPISODE_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/episodeofcare-type"
OBSERVATION_CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
UCUM = "http://unitsofmeasure.org"

ENCOUNTER_CLASS_DISPLAY = {
    "IMP": "inpatient encounter",
    "NONAC": "inpatient non-acute",
    "AMB": "ambulatory",
}
TEDS_REASON_DISPLAY = {
    DischargeReason.COMPLETED: "Treatment completed",
    DischargeReason.TRANSFERRED: "Transferred to further treatment",
    DischargeReason.DROPPED_OUT: "Dropped out (left against professional advice)",
    DischargeReason.TERMINATED: "Terminated by facility",
    DischargeReason.INCARCERATED: "Incarcerated",
    DischargeReason.DEATH: "Death",
    DischargeReason.OTHER: "Other",
}
STAY_ENTRY_DISPLAY = {
    "admission": "admission",
    "readmission": "readmission",
    "step_down": "step-down",
    "step_up": "step-up",
    "lateral": "lateral move",
}
#: Observation.code of an assessment, and the codes of its non-dimension components.
ASSESSMENT_CODE = "level-of-care-assessment"
INDICATED_LEVEL_CODE = "indicated-level"
HOURS_SCHEDULED_CODE = "hours-scheduled"

Entry = PatientAdmitted | PatientReadmitted
Opening = PatientAdmitted | PatientReadmitted | LevelTransitioned


def dimension_system(policy_id: str) -> str:
    return f"urn:care-continuum:policy:{policy_id}:dimension"


def rating_system(policy_id: str) -> str:
    return f"urn:care-continuum:policy:{policy_id}:rating"


def extension_url(name: str) -> str:
    return EXTENSION_BASE + name


def resource_id(resource_type: str, source_id: UUID | str) -> str:
    """The id of the resource of this type made from a patient key, episode id or event id."""
    return str(uuid5(RESOURCE_ID_NAMESPACE, f"{resource_type}/{source_id}"))


def resource_url(resource_type: str, source_id: UUID | str) -> str:
    """The Bundle.entry.fullUrl of a resource, and what references to it say."""
    return f"urn:uuid:{resource_id(resource_type, source_id)}"


# -- what the fold says is valid --------------------------------------------------------------


@dataclass(frozen=True)
class _Stay:
    """One placement: from the event that opened it to the next surviving placement change."""

    opened_by: Opening
    episode_id: UUID
    placement: Placement
    end: dt.datetime | None
    discharge: PatientDischarged | None
    valid: bool

    @property
    def start(self) -> dt.datetime:
        return self.opened_by.occurred_at


@dataclass(frozen=True)
class _Record:
    """The patient's events as the domain's fold leaves them."""

    events: dict[UUID, PatientEvent]
    state: PatientState
    valid_changes: list[PatientEvent]
    valid_episodes: set[UUID]

    @classmethod
    def of(
        cls, patient_key: str, events: Sequence[PatientEvent], policies: PolicyRegistry
    ) -> _Record:
        for event in events:
            if event.stream_id != patient_key:
                raise ValueError(
                    f"event {event.event_id} belongs to {event.stream_id}, not {patient_key}"
                )
        state = replay(patient_key, events, policies)
        by_id = {event.event_id: event for event in events}
        return cls(
            events=by_id,
            state=state,
            valid_changes=[by_id[change.event_id] for change in state.changes],
            valid_episodes={episode.episode_id for episode in state.episodes},
        )

    def is_voided(self, event_id: UUID) -> bool:
        return event_id in self.state.voided

    def stays(self) -> list[_Stay]:
        """Every stay in stream order: the surviving ones with their ends, and those a void
        undid (valid=False, no end)."""
        surviving: dict[UUID, _Stay] = {}
        changes = self.valid_changes
        for i, event in enumerate(changes):
            if not isinstance(event, Opening):
                continue
            following = changes[i + 1] if i + 1 < len(changes) else None
            surviving[event.event_id] = _Stay(
                opened_by=event,
                episode_id=event.data.episode_id,
                placement=event.data.placement,
                end=following.occurred_at if following is not None else None,
                discharge=following if isinstance(following, PatientDischarged) else None,
                valid=True,
            )
        stays = []
        for event in self.events.values():
            if not isinstance(event, Opening):
                continue
            stays.append(
                surviving.get(event.event_id)
                or _Stay(
                    opened_by=event,
                    episode_id=event.data.episode_id,
                    placement=event.data.placement,
                    end=None,
                    discharge=None,
                    valid=False,
                )
            )
        return stays

    def discharge_of(self, episode_id: UUID) -> PatientDischarged | None:
        for event in self.valid_changes:
            if isinstance(event, PatientDischarged) and event.data.episode_id == episode_id:
                return event
        return None


# -- the export -------------------------------------------------------------------------------


def patient_bundle(
    patient_key: str,
    events: Sequence[PatientEvent],
    policies: PolicyRegistry,
    *,
    timestamp: dt.datetime | None = None,
) -> Bundle:
    """A FHIR R4 collection Bundle of one patient's episodes, level stays and assessments.

    `events` are the patient's whole stream in stream order. `timestamp`, when given, is
    recorded as Bundle.timestamp (when the export was assembled); without it the Bundle is a
    pure function of the events. Raises UnknownPatient for an empty stream and UnknownPolicy
    when an event names a policy id that is not loaded (a missing version of a loaded id falls
    back to the newest loaded version of that id, for names and encounter classes only).
    """
    if not events:
        raise UnknownPatient(
            f"no patient with key {patient_key}", field="patient_key", patient=patient_key
        )
    record = _Record.of(patient_key, events, policies)
    patient_ref = Reference(reference=resource_url("Patient", patient_key))
    stays = record.stays()
    resources: list[Resource] = [_patient(patient_key)]
    resources += [
        _episode_of_care(event, record, patient_ref) for event in events if isinstance(event, Entry)
    ]
    resources += [_encounter(stay, policies, patient_ref) for stay in stays]
    resources += [
        _observation(event, record, stays, policies, patient_ref)
        for event in events
        if isinstance(event, Entry | ReassessmentRecorded)
    ]
    return Bundle(
        type="collection",
        timestamp=timestamp,
        meta=Meta(
            security=[
                Coding(system=V3_ACT_CODE, code="42CFRPart2", display="42 CFR Part2"),
                Coding(system=V3_CONFIDENTIALITY, code="R", display="restricted"),
            ]
        ),
        entry=[
            BundleEntry(fullUrl=f"urn:uuid:{resource.id}", resource=resource)
            for resource in resources
        ],
    )


def _patient(patient_key: str) -> Patient:
    """The pseudonymous key and nothing else: identity is kept apart from the events."""
    return Patient(
        id=resource_id("Patient", patient_key),
        identifier=[Identifier(system=PATIENT_KEY_SYSTEM, value=patient_key)],
    )


def _episode_of_care(entry: Entry, record: _Record, patient: Reference) -> EpisodeOfCare:
    data = entry.data
    valid = data.episode_id in record.valid_episodes
    discharge = record.discharge_of(data.episode_id) if valid else None
    policy_ref = _policy_ref(entry)
    extensions = [
        Extension(url=extension_url("episode-number"), valuePositiveInt=data.episode_number),
        _policy_extension(policy_ref),
    ]
    if isinstance(entry, PatientReadmitted):
        extensions.append(
            Extension(
                url=extension_url("previous-episode"),
                valueReference=Reference(
                    reference=resource_url("EpisodeOfCare", entry.data.previous_episode_id)
                ),
            )
        )
    if discharge is not None:
        reason = discharge.data.reason
        extensions += [
            Extension(
                url=extension_url("discharge-reason"),
                valueCoding=Coding(
                    system=TEDS_REASON_SYSTEM,
                    code=reason.value,
                    display=TEDS_REASON_DISPLAY[reason],
                ),
            ),
            Extension(
                url=extension_url("discharge-disposition"),
                valueCoding=Coding(
                    system=DISCHARGE_DISPOSITION_SYSTEM, code=discharge.data.disposition.value
                ),
            ),
        ]
    status = _status(valid=valid, ended=discharge is not None, open_status="active")
    return EpisodeOfCare(
        id=resource_id("EpisodeOfCare", data.episode_id),
        extension=extensions,
        identifier=[Identifier(system=EPISODE_ID_SYSTEM, value=str(data.episode_id))],
        status=status,
        type=[
            CodeableConcept(
                coding=[
                    Coding(
                        system=EPISODE_TYPE_SYSTEM,
                        code="da",
                        display="Drug and alcohol rehabilitation",
                    )
                ]
            )
        ],
        patient=patient,
        period=Period(
            start=entry.occurred_at,
            end=discharge.occurred_at if discharge is not None else None,
        ),
    )


def _encounter(stay: _Stay, policies: PolicyRegistry, patient: Reference) -> Encounter:
    opened = stay.opened_by
    placement = stay.placement
    policy_ref = _policy_ref(opened)
    policy = _policy(policy_ref, policies)
    # Encounter.class is required: a level the loaded policy does not know raises UnknownLevel.
    encounter_class = policy.level(placement.level).encounter_class
    if isinstance(opened, LevelTransitioned):
        entry_kind = opened.data.direction.value
        evidence = opened.data.reassessment_event_id
    else:
        entry_kind = "admission" if isinstance(opened, PatientAdmitted) else "readmission"
        evidence = opened.event_id  # the admission's own assessment
    extensions = [_policy_extension(policy_ref)]
    if placement.variance_reason is not None:
        extensions.append(
            Extension(
                url=extension_url("variance-reason"),
                valueCoding=Coding(
                    system=VARIANCE_REASON_SYSTEM, code=placement.variance_reason.value
                ),
            )
        )
    if placement.authorization_ref is not None:
        extensions.append(
            Extension(
                url=extension_url("authorization"),
                valueIdentifier=Identifier(
                    system=AUTHORIZATION_SYSTEM, value=placement.authorization_ref
                ),
            )
        )
    if placement.program is not None:
        extensions.append(
            Extension(
                url=extension_url("program"),
                valueIdentifier=Identifier(system=PROGRAM_SYSTEM, value=placement.program),
            )
        )
    status = _status(valid=stay.valid, ended=stay.end is not None, open_status="in-progress")
    hospitalization = None
    if stay.discharge is not None:
        hospitalization = EncounterHospitalization(
            dischargeDisposition=CodeableConcept(
                coding=[
                    Coding(
                        system=DISCHARGE_DISPOSITION_SYSTEM,
                        code=stay.discharge.data.disposition.value,
                    )
                ]
            )
        )
    return Encounter(
        id=resource_id("Encounter", opened.event_id),
        extension=extensions,
        identifier=[Identifier(system=EVENT_ID_SYSTEM, value=str(opened.event_id))],
        status=status,
        class_fhir=Coding(
            system=V3_ACT_CODE,
            code=encounter_class,
            display=ENCOUNTER_CLASS_DISPLAY[encounter_class],
        ),
        type=[
            CodeableConcept(
                coding=[
                    Coding(
                        system=STAY_ENTRY_SYSTEM,
                        code=entry_kind,
                        display=STAY_ENTRY_DISPLAY[entry_kind],
                    )
                ]
            )
        ],
        serviceType=CodeableConcept(coding=[_level_coding(policy, policy_ref, placement.level)]),
        subject=patient,
        episodeOfCare=[Reference(reference=resource_url("EpisodeOfCare", stay.episode_id))],
        period=Period(start=stay.start, end=stay.end),
        reasonReference=[Reference(reference=resource_url("Observation", evidence))],
        hospitalization=hospitalization,
        serviceProvider=Reference(identifier=Identifier(system=SITE_SYSTEM, value=placement.site)),
    )


def _observation(
    event: Entry | ReassessmentRecorded,
    record: _Record,
    stays: list[_Stay],
    policies: PolicyRegistry,
    patient: Reference,
) -> Observation:
    assessment = event.data.assessment
    episode_id = event.data.episode_id
    valid = not record.is_voided(event.event_id) and episode_id in record.valid_episodes
    policy_ref = _policy_ref(event)
    policy = _policy(policy_ref, policies)
    encounter = _stay_at(stays, episode_id, event) if valid else None
    derived_from = None
    if assessment.source_ref is not None:
        derived_from = [
            Reference(
                type="DocumentReference",
                identifier=Identifier(system=SOURCE_RECORD_SYSTEM, value=assessment.source_ref),
            )
        ]
    return Observation(
        id=resource_id("Observation", event.event_id),
        extension=[_policy_extension(policy_ref)],
        identifier=[Identifier(system=EVENT_ID_SYSTEM, value=str(event.event_id))],
        status="final" if valid else "entered-in-error",
        category=[
            CodeableConcept(
                coding=[Coding(system=OBSERVATION_CATEGORY_SYSTEM, code="survey", display="Survey")]
            )
        ],
        code=CodeableConcept(
            coding=[
                Coding(
                    system=OBSERVATION_SYSTEM,
                    code=ASSESSMENT_CODE,
                    display="Multidimensional level-of-care assessment",
                )
            ]
        ),
        subject=patient,
        encounter=(
            Reference(reference=resource_url("Encounter", encounter.opened_by.event_id))
            if encounter is not None
            else None
        ),
        effectiveDateTime=event.occurred_at,
        issued=event.recorded_at,
        performer=[
            Reference(identifier=Identifier(system=ASSESSOR_SYSTEM, value=assessment.assessor_id))
        ],
        method=CodeableConcept(
            coding=[Coding(system=INSTRUMENT_SYSTEM, code=assessment.instrument)]
        ),
        derivedFrom=derived_from,
        component=_components(assessment, policy, policy_ref),
    )


def _components(
    assessment: Assessment, policy: Policy, policy_ref: PolicyRef
) -> list[ObservationComponent]:
    names = {dimension.code: dimension.name for dimension in policy.dimensions}
    order = [d for d in names if d in assessment.ratings]
    order += sorted(d for d in assessment.ratings if d not in names)
    components = [
        ObservationComponent(
            code=CodeableConcept(
                coding=[
                    Coding(
                        system=dimension_system(policy_ref.id),
                        version=policy_ref.version,
                        code=dimension,
                        display=names.get(dimension),
                    )
                ]
            ),
            valueCodeableConcept=CodeableConcept(
                coding=[
                    Coding(
                        system=rating_system(policy_ref.id),
                        version=policy_ref.version,
                        code=assessment.ratings[dimension],
                    )
                ]
            ),
        )
        for dimension in order
    ]
    components.append(
        ObservationComponent(
            code=CodeableConcept(
                coding=[
                    Coding(
                        system=OBSERVATION_SYSTEM,
                        code=INDICATED_LEVEL_CODE,
                        display="Level of care the policy indicates",
                    )
                ]
            ),
            valueCodeableConcept=CodeableConcept(
                coding=[_level_coding(policy, policy_ref, assessment.indicated_level)]
            ),
        )
    )
    if assessment.hours_scheduled is not None:
        components.append(
            ObservationComponent(
                code=CodeableConcept(
                    coding=[
                        Coding(
                            system=OBSERVATION_SYSTEM,
                            code=HOURS_SCHEDULED_CODE,
                            display="Hours of service scheduled per week",
                        )
                    ]
                ),
                valueQuantity=Quantity(
                    value=assessment.hours_scheduled, unit="h/wk", system=UCUM, code="h/wk"
                ),
            )
        )
    components += [
        ObservationComponent(
            code=CodeableConcept(coding=[Coding(system=INSTRUMENT_SCORE_SYSTEM, code=name)]),
            valueQuantity=Quantity(value=score),
        )
        for name, score in sorted(assessment.scores.items())
    ]
    return components


# -- helpers ----------------------------------------------------------------------------------


def _stay_at(stays: list[_Stay], episode_id: UUID, event: EventEnvelope) -> _Stay | None:
    """The surviving stay of the episode the assessment was made in: its own stay for an
    admission, else the latest stay of the episode that had begun by the assessment's time."""
    candidates = [s for s in stays if s.valid and s.episode_id == episode_id]
    for stay in candidates:
        if stay.opened_by.event_id == event.event_id:
            return stay
    begun = [s for s in candidates if s.start <= event.occurred_at]
    return begun[-1] if begun else None


def _status(*, valid: bool, ended: bool, open_status: str) -> str:
    """entered-in-error for what a void undid, else finished or the resource's open status."""
    if not valid:
        return "entered-in-error"
    return "finished" if ended else open_status


def _policy_ref(event: EventEnvelope) -> PolicyRef:
    if event.policy is None:  # decision events always carry one; the contract allows null
        raise ValueError(f"{event.event_type} {event.event_id} names no policy")
    return event.policy


def _policy(ref: PolicyRef, policies: PolicyRegistry) -> Policy:
    """The version that judged the event, or the newest loaded version of the same id."""
    try:
        return policies.get(ref.id, ref.version)
    except UnknownPolicy:
        return policies.latest(ref.id)  # raises UnknownPolicy when the id is not loaded


def _level(policy: Policy, code: str) -> Level | None:
    return policy.levels_by_code.get(code)


def _level_coding(policy: Policy, ref: PolicyRef, code: str) -> Coding:
    level = _level(policy, code)
    return Coding(
        system=policy.code_system,
        version=ref.version,
        code=code,
        display=level.name if level is not None else None,
    )


def _policy_extension(ref: PolicyRef) -> Extension:
    return Extension(
        url=extension_url("policy"),
        valueCoding=Coding(system=POLICY_SYSTEM, code=ref.id, version=ref.version),
    )
