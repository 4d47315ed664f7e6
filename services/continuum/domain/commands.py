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
from continuum_events.consent import ConsentPurpose

#: A person's name: letters of any script, with spaces, apostrophes, hyphens and periods
#: between them ("O'Brien", "Anne-Marie", "J. R."). Digits, quotes, brackets, semicolons and
#: control characters are refused: a name field is never a place for code or narrative.
PersonName = Annotated[
    str,
    StringConstraints(pattern=r"^[^\W\d_](?:[^\W\d_]|[ '\u2019.\-]){0,99}$", strip_whitespace=True),
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


class GiveConsent(_Command):
    """Record a patient's signed consent to disclose their records to one organization."""

    patient_key: PatientKey
    consent_id: Code
    #: Checked by the domain (rule consent.org_malformed), which says what a code looks like.
    recipient_org: str
    purposes: list[ConsentPurpose]
    #: Default: the service's date (UTC).
    given_on: dt.date | None = None
    expires_on: dt.date | None = None
    document_ref: Code
    occurred_at: AwareDatetime | None = None


class RevokeConsent(_Command):
    """Record that the patient revoked a consent; disclosure under it stops from here on."""

    patient_key: PatientKey
    consent_id: Code
    #: Default: the service's date (UTC).
    revoked_on: dt.date | None = None
    occurred_at: AwareDatetime | None = None


Command = (
    Admit
    | Readmit
    | RecordReassessment
    | Transition
    | RecordAttendance
    | Discharge
    | VoidEvent
    | GiveConsent
    | RevokeConsent
)
