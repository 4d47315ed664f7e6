"""HL7 v2 pipe-delimited ADT messages -> `AdtMessage`, parsed with python-hl7 (`hl7`).

Segments may be separated by CR (the standard), LF or CRLF; MLLP framing bytes are dropped.
Text is UTF-8, or ISO 8859-1 when MSH-18 says 8859/1.
Timestamps are HL7 TS/DTM, YYYYMMDD[HH[MM[SS[.S...]]]][+/-ZZZZ]; one without an offset is local
time at the facility (the mapping's timezone). Every error names the segment-field at fault
(e.g. "PV1-3: ...") and never echoes a value from PID or a time.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import hl7
from pydantic import ValidationError

from continuum.ingest.adt import (
    HOURS_ID,
    RATING_PREFIX,
    SUPPORTED_TRIGGERS,
    VARIANCE_ID,
    AdtMessage,
    Location,
)
from continuum.ingest.errors import AdtParseError

_TS = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})(?P<d>\d{2})"
    r"(?:(?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})(?:\.(?P<frac>\d{1,4}))?)?)?)?"
    r"(?P<tz>[+-]\d{4})?$"
)
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})")
#: OBX-11 result statuses whose value must not be used: deleted, cannot be obtained.
_DISCARDED_STATUSES = {"D", "X", "W"}


def parse_ts(text: str, tz: dt.tzinfo, *, where: str, what: str) -> dt.datetime:
    """An HL7 timestamp as an aware datetime; naive ones are local time in `tz`."""
    match = _TS.match(text.strip())
    if match is None:
        raise AdtParseError(
            f"{where}: {what} is not an HL7 timestamp (YYYYMMDD[HHMM[SS]][+/-ZZZZ])", field=where
        )
    parts = match.groupdict()
    offset = parts["tz"]
    zone: dt.tzinfo = tz
    if offset is not None:
        hours, minutes = int(offset[1:3]), int(offset[3:5])
        if hours > 14 or minutes > 59:
            raise AdtParseError(f"{where}: {what} has an impossible UTC offset", field=where)
        sign = -1 if offset[0] == "-" else 1
        zone = dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    try:
        return dt.datetime(
            int(parts["y"]),
            int(parts["mo"]),
            int(parts["d"]),
            int(parts["h"] or 0),
            int(parts["mi"] or 0),
            int(parts["s"] or 0),
            int((parts["frac"] or "0").ljust(6, "0")),
            tzinfo=zone,
        )
    except ValueError:
        raise AdtParseError(f"{where}: {what} is not a valid date and time", field=where) from None


def parse_date(text: str, *, where: str, what: str) -> dt.date:
    match = _DATE.match(text.strip())
    try:
        if match is None:
            raise ValueError
        return dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise AdtParseError(f"{where}: {what} is not a date (YYYYMMDD)", field=where) from None


def _normalize(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            header = raw.replace(b"\n", b"\r").split(b"\r", 1)[0]
            if b"8859/1" not in header:  # MSH-18 character set
                raise AdtParseError(
                    "MSH-18: message is not UTF-8 and names no other supported character set "
                    "(8859/1)",
                    field="MSH-18",
                ) from None
            text = raw.decode("latin-1")
    else:
        text = raw
    text = text.strip().strip("\x0b\x1c").strip()
    lines = [
        line.strip("\n") for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
    ]
    return "\r".join(line for line in lines if line.strip())


class _Message:
    """Safe field access: a missing segment, field or component reads as ''."""

    def __init__(self, parsed: Any) -> None:
        self.by_name: dict[str, list[Any]] = {}
        for segment in parsed:
            self.by_name.setdefault(str(segment[0]), []).append(segment)

    def segments(self, name: str) -> list[Any]:
        return self.by_name.get(name, [])

    def has(self, name: str) -> bool:
        return bool(self.segments(name))

    def get(self, name: str, field: int, component: int = 1, sub: int = 1, rep: int = 1) -> str:
        found = self.segments(name)
        return _value(found[0], field, component, sub, rep) if found else ""


def _value(segment: Any, field: int, component: int = 1, sub: int = 1, rep: int = 1) -> str:
    try:
        value = segment.extract_field(1, field, rep, component, sub)
    except (IndexError, KeyError, TypeError, ValueError):
        return ""
    return str(value).strip()


def _repetitions(segment: Any, field: int) -> int:
    try:
        if field >= len(segment):
            return 0
        item = segment(field)
    except (IndexError, TypeError):
        return 0
    return len(item) if isinstance(item, hl7.Field) else 1


def _opt(text: str) -> str | None:
    return text or None


def parse(raw: bytes | str, tz: dt.tzinfo) -> AdtMessage:
    """Parse one HL7 v2 ADT message. Raises `AdtParseError` naming the segment-field."""
    text = _normalize(raw)
    if not text.startswith("MSH") or len(text) < 8:
        raise AdtParseError(
            "MSH: the message does not start with an MSH segment and its encoding characters",
            field="MSH",
        )
    try:
        parsed = hl7.parse(text)
    except (hl7.ParseException, IndexError, KeyError, ValueError) as exc:
        raise AdtParseError(
            f"MSH: not parseable as HL7 v2 ({type(exc).__name__})", field="MSH"
        ) from None
    msg = _Message(parsed)

    message_type = msg.get("MSH", 9, 1)
    trigger = msg.get("MSH", 9, 2) or msg.get("EVN", 1)
    if message_type != "ADT":
        raise AdtParseError(
            f"MSH-9: message type {message_type or '(empty)'} is not ADT", field="MSH-9"
        )
    if trigger not in SUPPORTED_TRIGGERS:
        raise AdtParseError(
            f"MSH-9: trigger event {trigger or '(empty)'} is not supported; supported: "
            + ", ".join(SUPPORTED_TRIGGERS),
            rule="adt.unsupported_trigger",
            field="MSH-9",
        )
    control_id = msg.get("MSH", 10)
    if not control_id:
        raise AdtParseError("MSH-10: missing message control id", field="MSH-10")
    facility = msg.get("MSH", 4) or msg.get("MSH", 3)
    if not facility:
        raise AdtParseError(
            "MSH-4: missing sending facility (and no sending application in MSH-3)", field="MSH-4"
        )
    msh7 = msg.get("MSH", 7)
    if not msh7:
        raise AdtParseError("MSH-7: missing date/time of message", field="MSH-7")
    message_time = parse_ts(msh7, tz, where="MSH-7", what="date/time of message")

    def ts(segment: str, field: int, what: str) -> dt.datetime | None:
        value = msg.get(segment, field)
        return parse_ts(value, tz, where=f"{segment}-{field}", what=what) if value else None

    event_time = ts("EVN", 6, "event occurred time") or ts("EVN", 2, "recorded date/time")

    if not msg.has("PID"):
        raise AdtParseError("PID: missing patient identification segment", field="PID")
    mrn = _mrn(msg)
    birth = msg.get("PID", 7)

    fields: dict[str, Any] = {
        "format": "hl7v2",
        "trigger": trigger,
        "control_id": control_id,
        "sending_facility": facility,
        "message_time": message_time,
        "event_time": event_time,
        "mrn": mrn,
        "family_name": _opt(msg.get("PID", 5, 1)),
        "given_name": _opt(msg.get("PID", 5, 2)),
        "birth_date": parse_date(birth, where="PID-7", what="birth date") if birth else None,
    }
    if msg.has("PV1"):
        fields.update(
            patient_class=_opt(msg.get("PV1", 2)),
            location=_location(msg, 3),
            prior_location=_location(msg, 6),
            hospital_service=_opt(msg.get("PV1", 10)),
            visit_number=_opt(msg.get("PV1", 19)),
            discharge_disposition=_opt(msg.get("PV1", 36)),
            admit_time=ts("PV1", 44, "admit date/time"),
            discharge_time=ts("PV1", 45, "discharge date/time"),
        )
    fields.update(_assessment(msg, tz))
    try:
        return AdtMessage.model_validate(fields)
    except ValidationError as exc:
        raise _validation_error(exc) from None


_FIELD_NAMES = {
    "control_id": "MSH-10",
    "sending_facility": "MSH-4",
    "location": "PV1-3",
    "prior_location": "PV1-6",
    "hospital_service": "PV1-10",
}


def _validation_error(exc: ValidationError) -> AdtParseError:
    issue = exc.errors()[0]
    where = _FIELD_NAMES.get(str(issue["loc"][0]), str(issue["loc"][0]))
    return AdtParseError(f"{where}: {issue['msg']}", field=where)


def _mrn(msg: _Message) -> str | None:
    """PID-3: the identifier whose type (CX.5) is MR, else the first one."""
    segment = msg.segments("PID")[0]
    first: str | None = None
    for rep in range(1, _repetitions(segment, 3) + 1):
        ident = _value(segment, 3, 1, rep=rep)
        if not ident:
            continue
        if _value(segment, 3, 5, rep=rep) == "MR":
            return ident
        first = first or ident
    return first


def _location(msg: _Message, field: int) -> Location | None:
    point_of_care = msg.get("PV1", field, 1)
    facility = msg.get("PV1", field, 4)
    if not point_of_care:
        return None
    try:
        return Location(point_of_care=point_of_care, facility=facility or None)
    except ValidationError:
        raise AdtParseError(
            f"PV1-{field}: location code has control characters or is too long",
            field=f"PV1-{field}",
        ) from None


def _assessment(msg: _Message, tz: dt.tzinfo) -> dict[str, Any]:
    """OBX segments with ASAM-D1..D6, ASAM-HOURS, ASAM-VARIANCE in OBX-3."""
    ratings: dict[str, str] = {}
    found: dict[str, Any] = {}
    for index, segment in enumerate(msg.segments("OBX"), start=1):
        ident = _value(segment, 3, 1).upper()
        if not ident.startswith("ASAM-"):
            continue
        where = f"OBX-5 (OBX #{index}, {ident})"
        if _value(segment, 11) in _DISCARDED_STATUSES:
            continue
        value = _value(segment, 5, 1)
        if ident.startswith(RATING_PREFIX) and ident[len(RATING_PREFIX) :].isdigit():
            dimension = ident[len(RATING_PREFIX) :]
            if dimension in ratings:
                raise AdtParseError(f"OBX-3: {ident} appears twice in the message", field="OBX-3")
            if not value:
                raise AdtParseError(f"{where}: missing rating", field="OBX-5")
            ratings[dimension] = value
        elif ident == HOURS_ID:
            try:
                found["hours_scheduled"] = float(value)
            except ValueError:
                raise AdtParseError(
                    f"{where}: hours per week is not a number", field="OBX-5"
                ) from None
        elif ident == VARIANCE_ID:
            found["variance_reason"] = value or None
        else:
            continue
        assessor = _value(segment, 16, 1)
        if assessor and "assessor_id" not in found:
            found["assessor_id"] = assessor
        observed = _value(segment, 14)
        if observed and "assessed_at" not in found:
            found["assessed_at"] = parse_ts(
                observed, tz, where=f"OBX-14 (OBX #{index})", what="observation time"
            )
    if ratings:
        found["ratings"] = ratings
    return found
