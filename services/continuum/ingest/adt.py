"""One inbound ADT message, whatever its wire format (HL7 v2 or the JSON form).

The parsers (`hl7v2`, `json_form`) produce this; `translate` turns it into commands. It holds
identifying data (MRN, name, birth date): those go to the identity table only, never into an
event or a log line.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

Trigger = Literal["A01", "A02", "A03", "A04", "A06", "A07", "A08", "A11", "A12", "A13"]
SUPPORTED_TRIGGERS: tuple[str, ...] = (
    "A01",
    "A02",
    "A03",
    "A04",
    "A06",
    "A07",
    "A08",
    "A11",
    "A12",
    "A13",
)

#: Control ids and facility ids become part of idempotency keys: printable ASCII, no spaces.
Token = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,50}$")]
#: Location and service codes as the hospital sends them.
SourceCode = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f]{1,80}$")]

#: OBX-3 identifiers carrying the assessment (dimension n -> ASAM-Dn).
RATING_PREFIX = "ASAM-D"
HOURS_ID = "ASAM-HOURS"
VARIANCE_ID = "ASAM-VARIANCE"


class Location(BaseModel):
    """HL7 PL: point of care (PV1-3.1) and facility (PV1-3.4)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    point_of_care: SourceCode
    facility: SourceCode | None = None

    def describe(self) -> str:
        return self.point_of_care + (f" at facility {self.facility}" if self.facility else "")


class AdtMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["hl7v2", "json"]
    trigger: Trigger
    control_id: Token
    sending_facility: Token
    message_time: AwareDatetime
    #: EVN-6 (event occurred) or EVN-2 (recorded); None when the message has neither.
    event_time: AwareDatetime | None = None

    # -- identity (PID): identity table only -----------------------------------------------
    mrn: str | None = None
    family_name: str | None = None
    given_name: str | None = None
    birth_date: dt.date | None = None

    # -- visit (PV1) ---------------------------------------------------------------------------
    patient_class: str | None = None
    location: Location | None = None
    prior_location: Location | None = None
    hospital_service: SourceCode | None = None
    visit_number: str | None = None
    discharge_disposition: str | None = None
    admit_time: AwareDatetime | None = None
    discharge_time: AwareDatetime | None = None

    # -- assessment (OBX ASAM-D1..D6, ASAM-HOURS, ASAM-VARIANCE) -------------------------------
    ratings: dict[str, str] = Field(default_factory=dict)
    hours_scheduled: float | None = None
    variance_reason: str | None = None
    assessor_id: str | None = None
    assessed_at: AwareDatetime | None = None

    @property
    def effective_time(self) -> dt.datetime:
        """When the event happened: EVN-6, else EVN-2, else the message time (MSH-7)."""
        return self.event_time or self.message_time

    @property
    def has_assessment(self) -> bool:
        return bool(self.ratings)

    def idempotency_key(self, step: str | None = None) -> str:
        """`adt:<sending facility>:<control id>[:<step>]`."""
        key = f"adt:{self.sending_facility}:{self.control_id}"
        return f"{key}:{step}" if step else key

    def describe(self) -> str:
        """For logs: no identifying data, only the message's coordinates."""
        return f"{self.trigger} {self.sending_facility}/{self.control_id} ({self.format})"


def localize(value: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """A time without an offset is local time at the facility."""
    return value if value.tzinfo is not None else value.replace(tzinfo=tz)
