"""An ADT message and the patient's current state -> the commands to run, in order.

    A01, A04       Admit (unknown MRN; identity from PID, kept out of events)
                   or Readmit (a discharged patient); needs the OBX assessment
    A02, A06, A07  RecordReassessment (when OBX ratings are present), then Transition to the
                   mapped level and site (nothing to move: the reassessment alone, or nothing)
    A03            Discharge, reason and disposition mapped from the NUBC code in PV1-36
    A08            identity update only: no event
    A11, A12, A13  VoidEvent (cancelled_by_source) of the latest placement change, which must
                   be an admission/readmission, a transition, a discharge respectively

Idempotency keys: the last command of a message carries `adt:<facility>:<control id>`, earlier
ones `adt:<facility>:<control id>:<step>`. Since the last command commits last, a stored key
`adt:<facility>:<control id>` means the whole message was applied.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from continuum.domain import commands as c
from continuum.domain.errors import UnknownPatient
from continuum.domain.machine import NEW
from continuum.domain.patient import PatientState
from continuum.ingest.adt import AdtMessage
from continuum.ingest.errors import AdtError, AdtMappingError, AdtNotApplicable, AdtParseError
from continuum.ingest.mapping import AdtMapping, Target
from continuum_events import AgeGroup, VoidReason

M = TypeVar("M", bound=BaseModel)

#: Cancel trigger -> (what it cancels, the event types that placement change may have).
CANCELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "A11": ("an admission", ("PatientAdmitted", "PatientReadmitted")),
    "A12": ("a transfer", ("LevelTransitioned",)),
    "A13": ("a discharge", ("PatientDischarged",)),
}

#: Command fields -> where they come from, for error messages.
_SOURCES = {
    "assessment.assessor_id": "OBX-16",
    "assessment.hours_scheduled": "OBX-5 (ASAM-HOURS)",
    "assessment.ratings": "OBX-5 (ASAM-D1..ASAM-D6)",
    "variance_reason": "OBX-5 (ASAM-VARIANCE)",
    "identity.mrn": "PID-3",
    "identity.family_name": "PID-5.1",
    "identity.given_name": "PID-5.2",
    "identity.birth_date": "PID-7",
    "occurred_at": "EVN-6",
}


@dataclass(frozen=True)
class Step:
    command: c.Command
    idempotency_key: str
    #: Set the Transition's reassessment_event_id from the previous step's event.
    uses_previous_event: bool = False


@dataclass(frozen=True)
class Plan:
    """What one message asks for. `summary` is for logs: codes only, no identifying data."""

    summary: str
    steps: tuple[Step, ...] = ()
    identity_update: tuple[str, c.Identity] | None = None
    patient_key: str | None = None


def translate(
    msg: AdtMessage,
    mapping: AdtMapping,
    *,
    patient_key: str | None,
    state: PatientState | None,
    terminal_state: str = "discharged",
) -> Plan:
    """The commands for `msg`, given the patient registered under its MRN (if any)."""
    if msg.trigger in ("A01", "A04"):
        return _admit(msg, mapping, patient_key, state, terminal_state)
    if patient_key is None or state is None:
        raise UnknownPatient(
            f"PID-3: no patient is registered with this MRN; {msg.trigger} needs a patient "
            "admitted through this feed (A01/A04) or registered with the same MRN",
            field="PID-3",
        )
    if msg.trigger in ("A02", "A06", "A07"):
        return _transfer(msg, mapping, patient_key, state)
    if msg.trigger == "A03":
        return _discharge(msg, mapping, patient_key)
    if msg.trigger == "A08":
        return Plan(
            summary="identity update",
            identity_update=(patient_key, _identity(msg)),
            patient_key=patient_key,
        )
    return _cancel(msg, patient_key, state)


# -- triggers --------------------------------------------------------------------------------


def _admit(
    msg: AdtMessage,
    mapping: AdtMapping,
    patient_key: str | None,
    state: PatientState | None,
    terminal_state: str,
) -> Plan:
    target = mapping.target_for(msg.location, msg.hospital_service)
    occurred_at = msg.admit_time or msg.effective_time
    assessment = _assessment(msg, mapping, required=True)
    common: dict[str, Any] = {
        "occurred_at": occurred_at,
        "level": target.level,
        "site": target.site,
        "program": target.program,
        "assessment": assessment,
        "variance_reason": msg.variance_reason,
    }
    key = msg.idempotency_key()
    if patient_key is None or state is None or state.state == NEW:
        # A new patient, or one whose only admission was cancelled (A11): admit again.
        command: c.Command = _build(
            c.Admit,
            {
                **common,
                "patient_key": patient_key,
                "age_group": _age_group(msg, mapping, occurred_at, required=True),
                "identity": _identity(msg) if patient_key is None else None,
            },
        )
        return Plan(
            f"admit to {target.level} at {target.site}", (Step(command, key),), None, patient_key
        )
    if state.state == terminal_state:
        command = _build(
            c.Readmit,
            {
                **common,
                "patient_key": patient_key,
                "age_group": _age_group(msg, mapping, occurred_at, required=False),
            },
        )
        return Plan(
            f"readmit to {target.level} at {target.site}", (Step(command, key),), None, patient_key
        )
    raise AdtNotApplicable(
        f"{msg.trigger}: patient {patient_key} is already in care at level {state.state}"
        f"{' at ' + state.site if state.site else ''}; send A02/A06/A07 to move them or A03 "
        "to discharge them first",
        rule="adt.already_in_care",
        field="MSH-9",
        patient=patient_key,
    )


def _transfer(msg: AdtMessage, mapping: AdtMapping, patient_key: str, state: PatientState) -> Plan:
    target = mapping.target_for(msg.location, msg.hospital_service)
    occurred_at = msg.effective_time
    steps: list[Step] = []
    if msg.has_assessment:
        reassess = _build(
            c.RecordReassessment,
            {
                "patient_key": patient_key,
                "occurred_at": msg.assessed_at or occurred_at,
                "assessment": _assessment(msg, mapping, required=True),
            },
        )
        steps.append(Step(reassess, msg.idempotency_key("reassessment")))
    if _same_placement(state, target):
        if steps:  # only the reassessment: it carries the message's key
            steps = [Step(steps[0].command, msg.idempotency_key())]
        return Plan(
            f"no change of placement ({target.level} at {target.site})"
            + (", reassessment recorded" if steps else ""),
            tuple(steps),
            None,
            patient_key,
        )
    move = _build(
        c.Transition,
        {
            "patient_key": patient_key,
            "occurred_at": occurred_at,
            "to_level": target.level,
            "site": target.site,
            "program": target.program,
            "variance_reason": msg.variance_reason,
        },
    )
    steps.append(Step(move, msg.idempotency_key(), uses_previous_event=bool(steps)))
    return Plan(f"move to {target.level} at {target.site}", tuple(steps), None, patient_key)


def _discharge(msg: AdtMessage, mapping: AdtMapping, patient_key: str) -> Plan:
    rule = mapping.discharge_for(msg.discharge_disposition)
    command = _build(
        c.Discharge,
        {
            "patient_key": patient_key,
            "occurred_at": msg.discharge_time or msg.effective_time,
            "reason": rule.reason,
            "disposition": rule.disposition,
        },
    )
    code = msg.discharge_disposition or "none"
    return Plan(
        f"discharge (PV1-36 {code}: {rule.reason.value}/{rule.disposition.value})",
        (Step(command, msg.idempotency_key()),),
        None,
        patient_key,
    )


def _cancel(msg: AdtMessage, patient_key: str, state: PatientState) -> Plan:
    what, event_types = CANCELS[msg.trigger]
    latest = state.changes[-1] if state.changes else None
    if latest is None or latest.event_type not in event_types:
        found = f"is {latest.event_type} (event {latest.event_id})" if latest else "is none"
        raise AdtNotApplicable(
            f"{msg.trigger} cancels {what}, but the latest placement change of patient "
            f"{patient_key} {found}; only the latest change can be cancelled",
            rule="adt.cancel_mismatch",
            field="MSH-9",
            patient=patient_key,
        )
    command = _build(
        c.VoidEvent,
        {
            "patient_key": patient_key,
            "event_id": latest.event_id,
            "reason": VoidReason.CANCELLED_BY_SOURCE,
            "occurred_at": msg.effective_time,
        },
    )
    return Plan(
        f"cancel {latest.event_type} {latest.event_id}",
        (Step(command, msg.idempotency_key()),),
        None,
        patient_key,
    )


# -- pieces ----------------------------------------------------------------------------------


def _same_placement(state: PatientState, target: Target) -> bool:
    return (
        state.state == target.level
        and state.site == target.site
        and (target.program is None or target.program == state.program)
    )


def _assessment(msg: AdtMessage, mapping: AdtMapping, *, required: bool) -> c.AssessmentInput:
    if required and not msg.has_assessment:
        raise AdtMappingError(
            f"OBX: {msg.trigger} needs the assessment: OBX segments with ASAM-D1..ASAM-D6 "
            "(dimension ratings), plus ASAM-HOURS for levels with an hours band",
            rule="adt.assessment_missing",
            field="OBX",
        )
    return _build(
        c.AssessmentInput,
        {
            "instrument": mapping.instrument,
            "assessor_id": msg.assessor_id or mapping.default_assessor,
            "ratings": dict(msg.ratings),
            "hours_scheduled": msg.hours_scheduled,
        },
        prefix="assessment.",
    )


def _identity(msg: AdtMessage) -> c.Identity:
    missing = [
        name
        for name, value in (
            ("PID-3 (MRN)", msg.mrn),
            ("PID-5.1 (family name)", msg.family_name),
            ("PID-5.2 (given name)", msg.given_name),
            ("PID-7 (birth date)", msg.birth_date),
        )
        if not value
    ]
    if missing:
        first = missing[0].split(" ")[0]
        raise AdtParseError(
            f"{first}: missing {', '.join(missing)}; {msg.trigger} needs them for the identity",
            rule="adt.missing_field",
            field=first,
        )
    return _build(
        c.Identity,
        {
            "mrn": msg.mrn,
            "family_name": msg.family_name,
            "given_name": msg.given_name,
            "birth_date": msg.birth_date,
        },
        prefix="identity.",
    )


def _age_group(
    msg: AdtMessage, mapping: AdtMapping, at: dt.datetime, *, required: bool
) -> AgeGroup | None:
    if msg.birth_date is None:
        if required:
            raise AdtParseError(
                f"PID-7: missing birth date; {msg.trigger} needs it (identity and age group)",
                rule="adt.missing_field",
                field="PID-7",
            )
        return None
    day = at.astimezone(mapping.tz).date()
    born = msg.birth_date
    age = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    return AgeGroup.ADOLESCENT if age < mapping.adolescent_below_age else AgeGroup.ADULT


def _build(model: type[M], values: dict[str, Any], *, prefix: str = "") -> M:
    """Validate a command; a failure names the message field and never echoes a value."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        issue = exc.errors()[0]
        loc = prefix + ".".join(str(p) for p in issue["loc"])
        source = next(
            (src for name, src in _SOURCES.items() if loc == name or loc.startswith(name + ".")),
            loc,
        )
        raise AdtError(
            f"{source}: {issue['msg']}", rule="adt.invalid_field", field=source
        ) from None
