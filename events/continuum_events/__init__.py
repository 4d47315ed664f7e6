"""The event contract of care-continuum: frozen pydantic models, one per event type.

This package depends on pydantic only. Producers and consumers (the service, projections,
hospital integrations) share it; the JSON Schemas in docs/events/schemas are generated from it.
"""

from continuum_events.codes import (
    ActorRole,
    AgeGroup,
    Direction,
    DischargeReason,
    Disposition,
    VarianceReason,
    VoidReason,
)
from continuum_events.consent import (
    CONSENT_EVENTS,
    ConsentGiven,
    ConsentGivenData,
    ConsentPurpose,
    ConsentRevoked,
    ConsentRevokedData,
)
from continuum_events.envelope import Actor, EventEnvelope, PolicyRef
from continuum_events.patient import (
    STATE_CHANGING_EVENTS,
    Assessment,
    AttendanceRecorded,
    AttendanceRecordedData,
    EventVoided,
    EventVoidedData,
    LevelTransitioned,
    LevelTransitionedData,
    PatientAdmitted,
    PatientAdmittedData,
    PatientDischarged,
    PatientDischargedData,
    PatientReadmitted,
    PatientReadmittedData,
    Placement,
    ReassessmentRecorded,
    ReassessmentRecordedData,
)
from continuum_events.registry import EVENT_TYPES, PatientEvent, parse_event, parse_event_json
from continuum_events.wire import canonical_json

__all__ = [
    "CONSENT_EVENTS",
    "EVENT_TYPES",
    "STATE_CHANGING_EVENTS",
    "Actor",
    "ActorRole",
    "AgeGroup",
    "Assessment",
    "AttendanceRecorded",
    "AttendanceRecordedData",
    "ConsentGiven",
    "ConsentGivenData",
    "ConsentPurpose",
    "ConsentRevoked",
    "ConsentRevokedData",
    "Direction",
    "DischargeReason",
    "Disposition",
    "EventEnvelope",
    "EventVoided",
    "EventVoidedData",
    "LevelTransitioned",
    "LevelTransitionedData",
    "PatientAdmitted",
    "PatientAdmittedData",
    "PatientDischarged",
    "PatientDischargedData",
    "PatientEvent",
    "PatientReadmitted",
    "PatientReadmittedData",
    "Placement",
    "PolicyRef",
    "ReassessmentRecorded",
    "ReassessmentRecordedData",
    "VarianceReason",
    "VoidReason",
    "canonical_json",
    "parse_event",
    "parse_event_json",
]
