"""Request bodies and responses of the HTTP API (the OpenAPI document is built from these).

Bodies are the commands without the patient key (it is in the path) and without the expected
version (it is the If-Match header): `to_command` adds both.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from continuum.domain import commands as c
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


class Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_command(
        self, kind: type[c.Command], *, patient_key: str | None, expected_version: int | None
    ) -> c.Command:
        fields = dict(self)
        if patient_key is not None:
            fields["patient_key"] = patient_key
        return kind(**fields, expected_version=expected_version)


class AdmitBody(Body):
    patient_key: PatientKey | None = Field(
        default=None, description="A pseudonymous key chosen by the caller; generated if absent."
    )
    occurred_at: AwareDatetime | None = None
    level: LevelCode
    site: Code
    program: Code | None = None
    age_group: AgeGroup
    assessment: c.AssessmentInput
    variance_reason: VarianceReason | None = None
    authorization_ref: Code | None = None
    identity: c.Identity | None = Field(
        default=None, description="Name, date of birth, MRN: stored apart, never in an event."
    )


class ReadmitBody(Body):
    occurred_at: AwareDatetime | None = None
    level: LevelCode
    site: Code
    program: Code | None = None
    age_group: AgeGroup | None = None
    assessment: c.AssessmentInput
    variance_reason: VarianceReason | None = None
    authorization_ref: Code | None = None


class ReassessmentBody(Body):
    occurred_at: AwareDatetime | None = None
    assessment: c.AssessmentInput


class TransitionBody(Body):
    occurred_at: AwareDatetime | None = None
    to_level: LevelCode
    site: Code | None = None
    program: Code | None = None
    reassessment_event_id: UUID | None = Field(
        default=None, description="The reassessment this move rests on (default: the latest)."
    )
    variance_reason: VarianceReason | None = None
    authorization_ref: Code | None = None


class AttendanceBody(Body):
    service_date: dt.date
    hours: float = Field(gt=0, le=24)
    occurred_at: AwareDatetime | None = None


class DischargeBody(Body):
    occurred_at: AwareDatetime | None = None
    reason: DischargeReason
    disposition: Disposition


class VoidBody(Body):
    event_id: UUID
    reason: VoidReason
    occurred_at: AwareDatetime | None = None


class ConsentBody(Body):
    consent_id: Code = Field(description="Unique among the patient's consents.")
    recipient_org: str = Field(
        description="The recipient organization's code: lowercase letters, digits, inner "
        "hyphens, at most 63 characters; it names the organization's disclosure topic.",
        max_length=63,
    )
    purposes: list[ConsentPurpose] = Field(min_length=1, max_length=3)
    given_on: dt.date | None = Field(default=None, description="Default: today (UTC).")
    expires_on: dt.date | None = Field(
        default=None, description="The last day in force (inclusive); absent: until revoked."
    )
    document_ref: Code = Field(description="Id of the signed form in the source record.")
    occurred_at: AwareDatetime | None = None


class RevocationBody(Body):
    consent_id: Code
    revoked_on: dt.date | None = Field(default=None, description="Default: today (UTC).")
    occurred_at: AwareDatetime | None = None


# -- responses -------------------------------------------------------------------------------


class EventRef(BaseModel):
    event_id: UUID
    event_type: str
    stream_version: int
    occurred_at: dt.datetime


class CommandResult(BaseModel):
    patient_key: str
    version: int = Field(description="The patient's stream version after the command (ETag).")
    events: list[EventRef]
    replayed: bool = Field(
        description="True when an Idempotency-Key matched an earlier request: nothing new "
        "was written and these are that request's events."
    )


class IdentityView(BaseModel):
    given_name: str
    family_name: str
    birth_date: dt.date
    mrn: str | None = None


class AssessmentView(BaseModel):
    event_id: UUID
    occurred_at: dt.datetime
    ratings: dict[str, str]
    indicated_level: str
    hours_scheduled: float | None = None


class EpisodeView(BaseModel):
    episode_id: UUID
    number: int
    admitted_at: dt.datetime
    age_group: str
    policy: str


class PatientView(BaseModel):
    patient_key: str
    version: int
    state: str = Field(description="The level of care, or 'discharged'.")
    active: bool
    site: str | None = None
    program: str | None = None
    placed_at: dt.datetime | None = None
    episode: EpisodeView | None = None
    latest_assessment: AssessmentView | None = None
    identity: IdentityView | None = Field(
        default=None, description="Only for roles allowed to see identity."
    )


class TimelineEvent(BaseModel):
    event: dict[str, Any] = Field(description="The event in its wire form (docs/events.md).")
    summary: str
    voided: bool


class Timeline(BaseModel):
    patient_key: str
    version: int
    events: list[TimelineEvent]


class PatientRow(BaseModel):
    patient_key: str
    state: str
    active: bool
    level: str | None = None
    site: str | None = None
    program: str | None = None
    age_group: str | None = None
    placed_at: dt.datetime | None = None
    days_in_level: int | None = None
    last_assessed_at: dt.datetime | None = None
    reassessment_overdue: bool
    identity: IdentityView | None = None


class PatientList(BaseModel):
    patients: list[PatientRow]
    total: int
    projection_position: int


class AccessEntryView(BaseModel):
    id: int
    at: dt.datetime
    subject: str
    role: str
    channel: str
    action: str
    resource: str
    purpose: str
    outcome: str
    patient_key: str | None = None
    token_id: str | None = None
    request_id: str | None = None
    records: int | None = None


class ConsentView(BaseModel):
    consent_id: str
    recipient_org: str
    purposes: list[str]
    given_on: dt.date
    expires_on: dt.date | None
    document_ref: str
    event_id: UUID
    status: str = Field(description="active, expired or revoked, as of today (UTC)")
    revoked_on: dt.date | None = None


class ConsentList(BaseModel):
    patient_key: str
    version: int
    consents: list[ConsentView]


class DisclosureView(BaseModel):
    id: int
    org: str
    patient_key: str
    event_id: str
    position: int
    consent_id: str
    topic: str
    partition: int
    offset: int
    disclosed_at: dt.datetime


class DisclosurePage(BaseModel):
    disclosures: list[DisclosureView]
    next_after_id: int | None = None


class AccessLogPage(BaseModel):
    entries: list[AccessEntryView]
    next_after_id: int | None = None


class Readiness(BaseModel):
    ready: bool
    database: str
    schema_revision: str | None = None
    head_position: int | None = None
    relay_lag: int | None = None
    #: What feeds the read models ("store", "kafka:TOPIC"); null before the first run.
    projection_source: str | None = None
    #: Events the read models are behind the store; null when they are fed from Kafka (the
    #: consumer group's lag applies: `continuum doctor`, /metrics).
    projection_lag: int | None = None
    problems: list[str] = Field(default_factory=list)
