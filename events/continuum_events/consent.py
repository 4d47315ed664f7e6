"""Consent events: a patient's written consent to disclose their records to one organization,
and its revocation (42 CFR Part 2, DOMAIN.md section 5).

They sit on the patient's own stream and never change the level-of-care state. Only codes
travel: the signed form stays in the source record, referenced by `document_ref`.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from continuum_events.codes import Code
from continuum_events.envelope import EventEnvelope, Frozen

#: The pattern of a recipient organization's code: lowercase letters, digits and inner hyphens,
#: at most 63 characters (a DNS label). The code names the organization's disclosure topic, so
#: it must be a safe, case-free topic-name segment.
ORG_CODE_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
OrgCode = Annotated[str, StringConstraints(pattern=ORG_CODE_PATTERN)]


class ConsentPurpose(StrEnum):
    """What the recipient may use the records for (the 2024 rule's single consent for all
    future treatment, payment and health care operations covers all three)."""

    TREATMENT = "treatment"
    PAYMENT = "payment"
    HEALTH_CARE_OPERATIONS = "health_care_operations"


class ConsentGivenData(Frozen):
    consent_id: Code = Field(description="Unique among the patient's consents.")
    recipient_org: OrgCode
    purposes: list[ConsentPurpose] = Field(
        min_length=1, description="Without repeats, in the order ConsentPurpose lists them."
    )
    given_on: dt.date = Field(description="The date the patient signed.")
    expires_on: dt.date | None = Field(
        default=None,
        description="The last day the consent is in force (inclusive); null: until revoked.",
    )
    document_ref: Code = Field(
        description="Id of the signed form in the source record; never its text."
    )


class ConsentRevokedData(Frozen):
    consent_id: Code
    recipient_org: OrgCode
    revoked_on: dt.date


class ConsentGiven(EventEnvelope):
    """The patient consented to disclose their records to `recipient_org` for `purposes`,
    from this event on, until it is revoked or expires."""

    EVENT_TYPE = "ConsentGiven"
    event_type: Literal["ConsentGiven"] = "ConsentGiven"
    schema_version: Literal[1] = 1
    data: ConsentGivenData


class ConsentRevoked(EventEnvelope):
    """The patient revoked a consent: nothing after this event is disclosed under it; what was
    disclosed before stays disclosed."""

    EVENT_TYPE = "ConsentRevoked"
    event_type: Literal["ConsentRevoked"] = "ConsentRevoked"
    schema_version: Literal[1] = 1
    data: ConsentRevokedData


CONSENT_EVENTS: frozenset[str] = frozenset({"ConsentGiven", "ConsentRevoked"})
