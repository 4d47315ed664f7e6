"""Commands: what a caller asks the service to do. Validated on construction (pydantic).

Entrypoints (CLI, HTTP, Kafka consumers) build these; they never call the store themselves.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from continuum_events.codes import (
    AgeGroup,
    Code,
    DischargeReason,
    Disposition,
    LevelCode,
    PatientKey,
    VarianceReason,
    VoidReason,
)

PersonName = Annotated[
    str, StringConstraints(pattern=r"^[^\x00-\x1f<>{}]{1,100}$", strip_whitespace=True)
]
Mrn = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9\-]{1,32}$")]


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: When set, the command is refused unless the patient's stream is at this version.
    expected_version: int | None = Field(default=None, ge=0)


class AssessmentInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    instrument: Code
    assessor_id: Code
    ratings: dict[Code, Code]
    hours_scheduled: float | None = Field(default=None, ge=0, le=168)
    scores: dict[Code, float] = Field(default_factory=dict)
    source_ref: Code | None = None


class Identity(BaseModel):
    """Identifying data. Stored apart from the event stream; never in an event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    given_name: PersonName
    family_name: PersonName
    birth_date: dt.date
    mrn: Mrn | None = None


class Admit(_Command):
    patient_key: PatientKey | None = None
    occurred_at: AwareDatetime | None = None
    level: LevelCode
    site: Code
    program: Code | None = None
    age_group: AgeGroup
    assessment: AssessmentInput
    variance_reason: VarianceReason | None = None
    authorization_ref: Code | None = None
    identity: Identity | None = None


class Readmit(_Command):
    patient_key: PatientKey
    occurred_at: AwareDatetime | None = None
    level: LevelCode
    site: Code
    program: Code | None = None
    age_group: AgeGroup | None = None
    assessment: AssessmentInput
    variance_reason: VarianceReason | None = None
    authorization_ref: Code | None = None


class RecordReassessment(_Command):
    patient_key: PatientKey
    occurred_at: AwareDatetime | None = None
    assessment: AssessmentInput


class Transition(_Command):
    patient_key: PatientKey
    occurred_at: AwareDatetime | None = None
    to_level: LevelCode
    site: Code | None = None
    program: Code | None = None
    reassessment_event_id: UUID | None = None
    variance_reason: VarianceReason | None = None
    authorization_ref: Code | None = None


class RecordAttendance(_Command):
    patient_key: PatientKey
    service_date: dt.date
    hours: float = Field(gt=0, le=24)
    occurred_at: AwareDatetime | None = None


class Discharge(_Command):
    patient_key: PatientKey
    occurred_at: AwareDatetime | None = None
    reason: DischargeReason
    disposition: Disposition


class VoidEvent(_Command):
    patient_key: PatientKey
    event_id: UUID
    reason: VoidReason
    occurred_at: AwareDatetime | None = None


Command = (
    Admit | Readmit | RecordReassessment | Transition | RecordAttendance | Discharge | VoidEvent
)
