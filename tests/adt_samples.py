"""Synthetic hospital ADT messages (HL7 v2 and the JSON form) for the ingest tests.

Everything here is invented: facility SIMGEN, MRNs SIM0001..., names TESTPATIENT^ALPHA...,
location codes from the bundled synthetic mapping (SIM-RES35, SIM-IOP, ...).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

#: Message structure (MSH-9.3) per trigger, as HL7 v2.5.1 defines them.
STRUCTURES = {
    "A01": "ADT_A01",
    "A02": "ADT_A02",
    "A03": "ADT_A03",
    "A04": "ADT_A01",
    "A06": "ADT_A06",
    "A07": "ADT_A06",
    "A08": "ADT_A01",
    "A11": "ADT_A09",
    "A12": "ADT_A12",
    "A13": "ADT_A01",
}

#: Ratings that the asam-3 reference policy places at each level (dimensions 1..6).
RATINGS_FOR = {
    "3.5": "012400",
    "3.7": "003000",
    "2.1": "012200",
    "1": "110000",
    "3.7-WM": "300000",
}

#: A complete, real-looking A01 with segments the ingest ignores (NK1, PV2, DG1, AL1, a
#: non-ASAM OBX). Synthetic data only.
SAMPLE_A01 = "\r".join(
    [
        "MSH|^~\\&|SIMADT|SIMGEN|CONTINUUM|SIMCARE|20260105093000-0600||ADT^A01^ADT_A01|"
        "MSG00001|P|2.5.1|||AL|NE|USA|UNICODE UTF-8",
        "EVN|A01|20260105093000-0600|||SIMUSER^TEST^USER|20260105091500-0600",
        "PID|1||ENT0001^^^SIMENT^PI~SIM0001^^^SIMGEN^MR||TESTPATIENT^ALPHA^Q^^^^L||19800101|F|||"
        "1 SYNTHETIC WAY^^SIMTOWN^ZZ^00000^^H||^PRN^PH^^^555^0100000|||S",
        "NK1|1|TESTCONTACT^BETA|SIB^Sibling^HL70063",
        "PV1|1|I|SIM-RES35^101^A^SIMGEN||||D0001^SIMDOC^ONE^^^DR|||SUD||||7|||D0001^SIMDOC^ONE"
        "^^^DR||V0001^^^SIMGEN^VN|||||||||||||||||||||||||20260105091500-0600",
        "PV2|||F10.20^Alcohol dependence, uncomplicated^I10",
        "DG1|1||F10.20^Alcohol dependence, uncomplicated^I10||20260105|A",
        "AL1|1|DA|NKA^No known allergies^L",
        "OBX|1|NM|CIWA-AR^CIWA-Ar total score^L||12|{score}|||||F|||20260105090000-0600",
        "OBX|2|NM|ASAM-D1^ASAM dimension 1^L||0||||||F|||20260105090000-0600||C0007^SIMCLIN",
        "OBX|3|NM|ASAM-D2^ASAM dimension 2^L||1||||||F|||20260105090000-0600||C0007^SIMCLIN",
        "OBX|4|NM|ASAM-D3^ASAM dimension 3^L||2||||||F|||20260105090000-0600||C0007^SIMCLIN",
        "OBX|5|NM|ASAM-D4^ASAM dimension 4^L||4||||||F|||20260105090000-0600||C0007^SIMCLIN",
        "OBX|6|NM|ASAM-D5^ASAM dimension 5^L||0||||||F|||20260105090000-0600||C0007^SIMCLIN",
        "OBX|7|NM|ASAM-D6^ASAM dimension 6^L||0||||||F|||20260105090000-0600||C0007^SIMCLIN",
    ]
)


def hl7_ts(when: dt.datetime | dt.date | None) -> str:
    """HL7 TS: YYYYMMDDHHMMSS, with +/-ZZZZ when `when` has an offset."""
    if when is None:
        return ""
    if not isinstance(when, dt.datetime):
        return when.strftime("%Y%m%d")
    text = when.strftime("%Y%m%d%H%M%S")
    offset = when.utcoffset()
    if offset is not None:
        minutes = int(offset.total_seconds() // 60)
        sign = "-" if minutes < 0 else "+"
        text += f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return text


def hl7(
    trigger: str,
    control_id: str,
    when: dt.datetime,
    *,
    mrn: str = "SIM0001",
    family: str = "TESTPATIENT",
    given: str = "ALPHA",
    birth: str = "19800101",
    location: str | None = "SIM-RES35",
    facility: str = "SIMGEN",
    prior_location: str | None = None,
    patient_class: str = "I",
    service: str = "SUD",
    disposition: str = "",
    admit_time: dt.datetime | None = None,
    discharge_time: dt.datetime | None = None,
    ratings: str | None = None,
    hours: float | None = None,
    variance: str | None = None,
    assessor: str = "C0007",
    sending_facility: str = "SIMGEN",
    separator: str = "\r",
) -> str:
    """A real-looking HL7 v2.5.1 ADT message; OBX ASAM-D1..D6 when `ratings` ("012400")."""
    ts = hl7_ts(when)
    pv1 = [""] * 46
    pv1[0] = "PV1"
    pv1[1] = "1"
    pv1[2] = patient_class
    pv1[3] = f"{location}^101^A^{facility}" if location else ""
    pv1[6] = f"{prior_location}^201^B^{facility}" if prior_location else ""
    pv1[7] = "D0001^SIMDOC^ONE^^^DR"
    pv1[10] = service
    pv1[19] = f"V{mrn[-4:]}^^^SIMGEN^VN"
    pv1[36] = disposition
    pv1[44] = hl7_ts(admit_time)
    pv1[45] = hl7_ts(discharge_time)
    segments = [
        f"MSH|^~\\&|SIMADT|{sending_facility}|CONTINUUM|SIMCARE|{ts}||ADT^{trigger}^"
        f"{STRUCTURES[trigger]}|{control_id}|P|2.5.1",
        f"EVN|{trigger}|{ts}|||SIMUSER^TEST^USER|{ts}",
        f"PID|1||ENT{mrn[-4:]}^^^SIMENT^PI~{mrn}^^^SIMGEN^MR||{family}^{given}^Q^^^^L||{birth}|F"
        "|||1 SYNTHETIC WAY^^SIMTOWN^ZZ^00000^^H",
        "|".join(pv1).rstrip("|"),
    ]
    n = 0
    for dim, rating in enumerate(ratings or "", start=1):
        n += 1
        segments.append(
            f"OBX|{n}|NM|ASAM-D{dim}^ASAM dimension {dim}^L||{rating}||||||F|||{ts}||{assessor}"
        )
    if hours is not None:
        n += 1
        segments.append(
            f"OBX|{n}|NM|ASAM-HOURS^Scheduled hours per week^L||{hours:g}|h/wk^hours per week^UCUM"
            f"|||||F|||{ts}||{assessor}"
        )
    if variance is not None:
        n += 1
        segments.append(f"OBX|{n}|CE|ASAM-VARIANCE^Variance reason^L||{variance}^^L||||||F")
    return separator.join(segments)


def json_doc(
    trigger: str,
    control_id: str,
    when: dt.datetime,
    *,
    mrn: str = "SIM0001",
    family: str = "TESTPATIENT",
    given: str = "ALPHA",
    birth: str = "1980-01-01",
    location: str | None = "SIM-RES35",
    facility: str = "SIMGEN",
    disposition: str | None = None,
    ratings: str | None = None,
    hours: float | None = None,
    variance: str | None = None,
    assessor: str = "C0007",
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": control_id,
        "trigger": trigger,
        "sending_facility": "SIMGEN",
        "message_time": when.isoformat(),
        "event_time": when.isoformat(),
        "patient": {"mrn": mrn, "family_name": family, "given_name": given, "birth_date": birth},
        "visit": {
            "patient_class": "I",
            "location": {"point_of_care": location, "facility": facility} if location else None,
            "hospital_service": "SUD",
            "visit_number": f"V{mrn[-4:]}",
            "discharge_disposition": disposition,
        },
    }
    if ratings:
        doc["assessment"] = {
            "ratings": {str(i): r for i, r in enumerate(ratings, start=1)},
            "hours_scheduled": hours,
            "variance_reason": variance,
            "assessor_id": assessor,
            "assessed_at": when.isoformat(),
        }
    return doc


def json_message(*args: Any, **kwargs: Any) -> bytes:
    return json.dumps(json_doc(*args, **kwargs)).encode()
