"""Every event type, and parsing a stored or received dict into the right model."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from continuum_events.consent import ConsentGiven, ConsentRevoked
from continuum_events.patient import (
    AttendanceRecorded,
    EventVoided,
    LevelTransitioned,
    PatientAdmitted,
    PatientDischarged,
    PatientReadmitted,
    ReassessmentRecorded,
)
from continuum_events.upcasting import upcast

PatientEvent = Annotated[
    PatientAdmitted
    | PatientReadmitted
    | ReassessmentRecorded
    | LevelTransitioned
    | AttendanceRecorded
    | PatientDischarged
    | EventVoided
    | ConsentGiven
    | ConsentRevoked,
    Field(discriminator="event_type"),
]

EVENT_TYPES: tuple[type[Any], ...] = (
    PatientAdmitted,
    PatientReadmitted,
    ReassessmentRecorded,
    LevelTransitioned,
    AttendanceRecorded,
    PatientDischarged,
    EventVoided,
    ConsentGiven,
    ConsentRevoked,
)

_ADAPTER: TypeAdapter[PatientEvent] = TypeAdapter(PatientEvent)


def parse_event(raw: dict[str, Any]) -> PatientEvent:
    """Upcast a raw event dict to the current schema version and validate it."""
    return _ADAPTER.validate_python(upcast(raw))


def parse_event_json(text: str | bytes) -> PatientEvent:
    """Parse one JSON-encoded event (an export line or a Kafka value)."""
    import json

    return parse_event(json.loads(text))
