"""Patient events: one model per event type, each with its own data payload.

Data payloads hold coded values only. Ratings are strings because each ASAM edition has its own
rating scale; the policy named in the envelope says which.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, Field

from continuum_events.codes import (
    AgeGroup,
    Code,
    Direction,
    DischargeReason,
    Disposition,
    LevelCode,
    VarianceReason,
    VoidReason,
)
from continuum_events.envelope import EventEnvelope, Frozen

Ratings = dict[Code, Code]


class Assessment(Frozen):
    """A dated multidimensional assessment and the level the policy's placement rule indicates."""

    instrument: Code
    assessor_id: Code
    ratings: Ratings = Field(description="Risk rating per dimension code, on the policy's scale.")
    indicated_level: LevelCode
    hours_scheduled: float | None = Field(
        default=None, ge=0, le=168, description="Hours of service per week in the plan."
    )
    scores: dict[Code, float] = Field(
        default_factory=dict, description="Instrument scores, e.g. CIWA-Ar or COWS totals."
    )
    source_ref: Code | None = Field(
        default=None, description="Id of the narrative in the source record; never the text."
    )


class Placement(Frozen):
    """Where the patient is placed and, if it differs from the indicated level, why."""

    level: LevelCode
    site: Code
    program: Code | None = None
    indicated_level: LevelCode
    variance_reason: VarianceReason | None = None
    authorization_ref: Code | None = None


class PatientAdmittedData(Frozen):
    episode_id: UUID
    episode_number: int = Field(ge=1)
    age_group: AgeGroup
    assessment: Assessment
    placement: Placement


class PatientReadmittedData(PatientAdmittedData):
    previous_episode_id: UUID


class ReassessmentRecordedData(Frozen):
    episode_id: UUID
    level_at_assessment: LevelCode
    assessment: Assessment


class LevelTransitionedData(Frozen):
    episode_id: UUID
    from_level: LevelCode
    from_site: Code
    direction: Direction
    placement: Placement
    reassessment_event_id: UUID
    reassessment_occurred_at: AwareDatetime
    reassessment_age_days: float = Field(ge=0)
    ratings: Ratings
    hours_scheduled: float | None = None


class AttendanceRecordedData(Frozen):
    episode_id: UUID
    service_date: dt.date
    hours: float = Field(gt=0, le=24)
    level: LevelCode
    site: Code


class PatientDischargedData(Frozen):
    episode_id: UUID
    from_level: LevelCode
    from_site: Code
    reason: DischargeReason
    disposition: Disposition


class EventVoidedData(Frozen):
    voided_event_id: UUID
    voided_event_type: str
    reason: VoidReason
    episode_id: UUID | None = None


class PatientAdmitted(EventEnvelope):
    """A patient entered care: first episode, initial assessment and placement."""

    EVENT_TYPE = "PatientAdmitted"
    event_type: Literal["PatientAdmitted"] = "PatientAdmitted"
    schema_version: Literal[1] = 1
    data: PatientAdmittedData


class PatientReadmitted(EventEnvelope):
    """A discharged patient entered care again: a new episode on the same patient key."""

    EVENT_TYPE = "PatientReadmitted"
    event_type: Literal["PatientReadmitted"] = "PatientReadmitted"
    schema_version: Literal[1] = 1
    data: PatientReadmittedData


class ReassessmentRecorded(EventEnvelope):
    """A dated reassessment: the evidence a later transition rests on."""

    EVENT_TYPE = "ReassessmentRecorded"
    event_type: Literal["ReassessmentRecorded"] = "ReassessmentRecorded"
    schema_version: Literal[1] = 1
    data: ReassessmentRecordedData


class LevelTransitioned(EventEnvelope):
    """A move between levels (or sites) with the reassessment it rests on."""

    EVENT_TYPE = "LevelTransitioned"
    event_type: Literal["LevelTransitioned"] = "LevelTransitioned"
    schema_version: Literal[1] = 1
    data: LevelTransitionedData


class AttendanceRecorded(EventEnvelope):
    """Hours of service attended on one date."""

    EVENT_TYPE = "AttendanceRecorded"
    event_type: Literal["AttendanceRecorded"] = "AttendanceRecorded"
    schema_version: Literal[1] = 1
    data: AttendanceRecordedData


class PatientDischarged(EventEnvelope):
    """The episode ended, with a TEDS reason and a FHIR discharge disposition."""

    EVENT_TYPE = "PatientDischarged"
    event_type: Literal["PatientDischarged"] = "PatientDischarged"
    schema_version: Literal[1] = 1
    data: PatientDischargedData


class EventVoided(EventEnvelope):
    """A mistaken earlier event is voided. Nothing is deleted; replay skips its effect."""

    EVENT_TYPE = "EventVoided"
    event_type: Literal["EventVoided"] = "EventVoided"
    schema_version: Literal[1] = 1
    data: EventVoidedData


STATE_CHANGING_EVENTS: frozenset[str] = frozenset(
    {"PatientAdmitted", "PatientReadmitted", "LevelTransitioned", "PatientDischarged"}
)
