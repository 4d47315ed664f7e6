"""Coded values carried by events.

Every value that crosses the event stream is a code, never free text: Part 2 and HIPAA's
minimum-necessary rule keep narrative in the source record, referenced by id.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import StringConstraints

#: Pseudonymous patient key: random, carries nothing about the person.
PatientKey = Annotated[str, StringConstraints(pattern=r"^pk-[a-z2-7]{20}$")]
#: A level or state code as the policy defines it ("2.1", "3.7-WM", "aftercare").
LevelCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,23}$")]
#: A short machine code: site, program, instrument, assessor id, reference ids.
Code = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")]


class AgeGroup(StrEnum):
    """Hours-per-week bands differ for adults and adolescents."""

    ADULT = "adult"
    ADOLESCENT = "adolescent"


class ActorRole(StrEnum):
    CASE_MANAGER = "case_manager"
    CLINICIAN = "clinician"
    AUDITOR = "auditor"
    INTEGRATION = "integration"
    ADMIN = "admin"
    SYSTEM = "system"


class Direction(StrEnum):
    """Computed from the policy's intensity ranks, never supplied by the caller."""

    STEP_DOWN = "step_down"
    STEP_UP = "step_up"
    LATERAL = "lateral"


class VarianceReason(StrEnum):
    """Why the level provided differs from the level the policy indicates."""

    PATIENT_PREFERENCE = "patient_preference"
    NO_SLOT = "no_slot"
    PAYER_DECISION = "payer_decision"
    CLINICAL_OVERRIDE = "clinical_override"


class DischargeReason(StrEnum):
    """TEDS reason for discharge."""

    COMPLETED = "completed"
    TRANSFERRED = "transferred"
    DROPPED_OUT = "dropped_out"
    TERMINATED = "terminated"
    INCARCERATED = "incarcerated"
    DEATH = "death"
    OTHER = "other"


class Disposition(StrEnum):
    """FHIR R4 Encounter.hospitalization.dischargeDisposition codes."""

    HOME = "home"
    ALTERNATIVE_HOME = "alt-home"
    OTHER_HEALTHCARE_FACILITY = "other-hcf"
    HOSPICE = "hosp"
    LONG_TERM_CARE = "long"
    LEFT_AGAINST_ADVICE = "aadvice"
    EXPIRED = "exp"
    PSYCHIATRIC_HOSPITAL = "psy"
    REHABILITATION = "rehab"
    SKILLED_NURSING = "snf"
    OTHER = "oth"


class VoidReason(StrEnum):
    """Why an event is voided; the event stays in the log, marked void by a later event."""

    ENTERED_IN_ERROR = "entered_in_error"
    WRONG_PATIENT = "wrong_patient"
    WRONG_DATE = "wrong_date"
    DUPLICATE = "duplicate"
    CANCELLED_BY_SOURCE = "cancelled_by_source"
