"""The JSON form of an ADT message: the same information as HL7 v2, for feeds that are not HL7.

    {
      "id": "MSG00001",                       control id (MSH-10): the idempotency key
      "trigger": "A01",                       A01 A02 A03 A04 A06 A07 A08 A11 A12 A13
      "sending_facility": "SIMGEN",           MSH-4
      "message_time": "2026-01-05T09:00:00-06:00",
      "event_time": "2026-01-05T08:55:00-06:00",          optional (EVN-6)
      "patient": {"mrn": "SIM0001", "family_name": "TESTPATIENT", "given_name": "ALPHA",
                  "birth_date": "1980-01-01"},
      "visit": {"patient_class": "I",
                "location": {"point_of_care": "SIM-RES35", "facility": "SIMGEN"},
                "prior_location": null, "hospital_service": null, "visit_number": "V0001",
                "discharge_disposition": null, "admit_time": null, "discharge_time": null},
      "assessment": {"ratings": {"1": "1", "2": "0", "3": "2", "4": "4", "5": "3", "6": "2"},
                     "hours_scheduled": null, "variance_reason": null,
                     "assessor_id": "clin-7", "assessed_at": null}
    }

Times are ISO 8601; a time without an offset is local time at the facility. Unknown keys are
refused (a typo must not pass silently). See docs/ingest.md.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from continuum.ingest.adt import AdtMessage, Location, Trigger, localize
from continuum.ingest.errors import AdtParseError


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JsonPatient(_Doc):
    mrn: str = Field(min_length=1)
    family_name: str | None = None
    given_name: str | None = None
    birth_date: dt.date | None = None


class JsonVisit(_Doc):
    patient_class: str | None = None
    location: Location | None = None
    prior_location: Location | None = None
    hospital_service: str | None = None
    visit_number: str | None = None
    discharge_disposition: str | None = None
    admit_time: dt.datetime | None = None
    discharge_time: dt.datetime | None = None


class JsonAssessment(_Doc):
    ratings: dict[str, str] = Field(min_length=1)
    hours_scheduled: float | None = None
    variance_reason: str | None = None
    assessor_id: str | None = None
    assessed_at: dt.datetime | None = None


class AdtJson(_Doc):
    id: str = Field(min_length=1)
    trigger: Trigger
    sending_facility: str = Field(min_length=1)
    message_time: dt.datetime
    event_time: dt.datetime | None = None
    patient: JsonPatient
    visit: JsonVisit | None = None
    assessment: JsonAssessment | None = None

    def to_message(self, tz: dt.tzinfo) -> AdtMessage:
        def local(value: dt.datetime | None) -> dt.datetime | None:
            return None if value is None else localize(value, tz)

        fields: dict[str, Any] = {
            "format": "json",
            "trigger": self.trigger,
            "control_id": self.id,
            "sending_facility": self.sending_facility,
            "message_time": localize(self.message_time, tz),
            "event_time": local(self.event_time),
            "mrn": self.patient.mrn,
            "family_name": self.patient.family_name,
            "given_name": self.patient.given_name,
            "birth_date": self.patient.birth_date,
        }
        if self.visit is not None:
            visit = self.visit
            fields.update(
                patient_class=visit.patient_class,
                location=visit.location,
                prior_location=visit.prior_location,
                hospital_service=visit.hospital_service,
                visit_number=visit.visit_number,
                discharge_disposition=visit.discharge_disposition,
                admit_time=local(visit.admit_time),
                discharge_time=local(visit.discharge_time),
            )
        if self.assessment is not None:
            a = self.assessment
            fields.update(
                ratings=dict(a.ratings),
                hours_scheduled=a.hours_scheduled,
                variance_reason=a.variance_reason,
                assessor_id=a.assessor_id,
                assessed_at=local(a.assessed_at),
            )
        return AdtMessage.model_validate(fields)


def parse(raw: bytes | str, tz: dt.tzinfo) -> AdtMessage:
    """Parse one JSON-form ADT message. Raises `AdtParseError` naming the JSON path."""
    try:
        document = json.loads(raw)
    except UnicodeDecodeError:
        raise AdtParseError("message is not UTF-8 text", field="json") from None
    except json.JSONDecodeError as exc:
        raise AdtParseError(
            f"json: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            field="json",
        ) from None
    if not isinstance(document, dict):
        raise AdtParseError("json: the message must be a JSON object", field="json")
    try:
        return AdtJson.model_validate(document).to_message(tz)
    except ValidationError as exc:
        issue = exc.errors()[0]
        where = ".".join(str(p) for p in issue["loc"]) or "json"
        where = {"control_id": "id"}.get(where, where)
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise AdtParseError(f"{where}: {issue['msg']}{more}", field=where) from None
