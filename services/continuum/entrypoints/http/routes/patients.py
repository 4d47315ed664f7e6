"""Patients: admit, read, timeline, FHIR export and the clinical commands.

Routes only translate HTTP to the service's commands and back; every rule lives in the domain.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from continuum.application.access import (
    AccessDenied,
    Permission,
    Principal,
    PurposeOfUse,
    require,
    require_any_site,
)
from continuum.application.ports import AppendResult
from continuum.application.service import CommandContext, unknown_patient
from continuum.domain import commands as c
from continuum.domain.errors import Duplicate
from continuum.domain.patient import PatientState
from continuum.entrypoints.http import models as m
from continuum.entrypoints.http.context import ApiContext
from continuum.entrypoints.http.deps import (
    Caller,
    Ctx,
    ExpectedVersion,
    IdempotencyKey,
    Purpose,
    etag,
)
from continuum.entrypoints.http.threads import in_thread
from continuum_events import Actor, ActorRole, PatientEvent
from continuum_events.codes import PatientKey

router = APIRouter(prefix="/v1/patients", tags=["patients"])

PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/problem+json": {}}}
    for status, text in [
        (400, "A malformed header"),
        (401, "No valid bearer token"),
        (403, "The role or site does not allow it"),
        (404, "No such patient"),
        (409, "A refused command, or the patient changed meanwhile"),
        (422, "Invalid input: every field and its reason"),
    ]
}

_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")


def actor_of(caller: Principal) -> Actor:
    """The event's actor: the token subject when it is a plain code, else a stable digest (a
    subject such as an e-mail address never goes into an event)."""
    subject = caller.subject
    if not _CODE.match(subject):
        subject = "sub-" + hashlib.sha256(subject.encode("utf-8")).hexdigest()[:32]
    return Actor(id=subject, role=ActorRole(caller.role.value))


def sites_of(events: Iterable[PatientEvent]) -> set[str]:
    """Every site the patient was placed or seen at."""
    found: set[str] = set()
    for event in events:
        data = event.data
        placement = getattr(data, "placement", None)
        if placement is not None:
            found.add(placement.site)
        for name in ("site", "from_site"):
            value = getattr(data, name, None)
            if isinstance(value, str):
                found.add(value)
    return found


def _read_patient(
    ctx: ApiContext,
    request: Request,
    caller: Principal,
    key: str,
    purpose: PurposeOfUse | None,
    action: str,
) -> list[PatientEvent]:
    """Load a patient for reading; record the access, allowed or denied."""
    ctx.app.store.sequence()
    events = ctx.app.service.history(key)  # 404 before any access is recorded
    try:
        require_any_site(caller, sites_of(events), Permission.READ_PATIENT)
    except AccessDenied:
        _audit(ctx, request, caller, action, key, purpose, allowed=False)
        raise
    _audit(ctx, request, caller, action, key, purpose, allowed=True)
    return events


def _audit(
    ctx: ApiContext,
    request: Request,
    caller: Principal,
    action: str,
    key: str | None,
    purpose: PurposeOfUse | None,
    *,
    allowed: bool,
    records: int | None = None,
) -> None:
    ctx.audit.record(
        caller,
        action=action,
        resource=request.url.path,
        purpose=purpose,
        allowed=allowed,
        patient_key=key,
        request_id=getattr(request.state, "request_id", None),
        records=records,
    )


def patient_view(ctx: ApiContext, caller: Principal, state: PatientState) -> m.PatientView:
    terminal = ctx.app.policies.default.terminal_state
    latest = state.latest_assessment()
    episode = state.episode
    identity = None
    if caller.sees_identity():
        found = ctx.app.store.identity(state.stream_id)
        if found is not None:
            identity = m.IdentityView(**found.model_dump())
    return m.PatientView(
        patient_key=state.stream_id,
        version=state.version,
        state=state.state,
        active=state.is_active(terminal),
        site=state.site,
        program=state.program,
        placed_at=state.placed_at,
        episode=None
        if episode is None
        else m.EpisodeView(
            episode_id=episode.episode_id,
            number=episode.number,
            admitted_at=episode.admitted_at,
            age_group=episode.age_group.value,
            policy=f"{episode.policy.id}@{episode.policy.version}",
        ),
        latest_assessment=None
        if latest is None
        else m.AssessmentView(
            event_id=latest.event_id,
            occurred_at=latest.occurred_at,
            ratings=latest.ratings,
            indicated_level=latest.indicated_level,
            hours_scheduled=latest.hours_scheduled,
        ),
        identity=identity,
    )


def _result(result: AppendResult, response: Response) -> m.CommandResult:
    response.headers["ETag"] = etag(result.stream_version)
    return m.CommandResult(
        patient_key=result.stream_id,
        version=result.stream_version,
        replayed=result.replayed,
        events=[
            m.EventRef(
                event_id=event.event_id,
                event_type=event.event_type,
                stream_version=event.stream_version,
                occurred_at=event.occurred_at,
            )
            for event in result.events
        ],
    )


def _handle(
    ctx: ApiContext,
    caller: Principal,
    command: c.Command,
    idempotency: str | None,
    authorize: Callable[[PatientState], None] | None = None,
) -> AppendResult:
    return ctx.app.service.handle(
        command,
        CommandContext(actor=actor_of(caller), idempotency_key=idempotency),
        authorize=authorize,
    )


def run_command(
    ctx: ApiContext,
    caller: Principal,
    permission: Permission,
    key: str,
    body: m.Body,
    kind: type[c.Command],
    *,
    expected: int | None,
    idempotency: str | None,
    response: Response,
    target_site: str | None = None,
) -> m.CommandResult:
    """A command on an existing patient: the role must allow it and cover the patient's current
    site (and the target site of a move to another site). The routes below and the console's
    forms call it, from a worker thread (it blocks on the database)."""
    require(caller, permission)
    if idempotency is not None:
        prior = ctx.app.store.find_idempotent(idempotency)
        if prior is not None and prior.stream_id != key:
            raise Duplicate(
                "this Idempotency-Key was used for a request on another patient",
                rule="idempotency.key_reused",
                field="Idempotency-Key",
            )

    def authorize(state: PatientState) -> None:
        if not state.exists:
            raise unknown_patient(key)
        require(caller, permission, site=state.site)
        if target_site is not None:
            require(caller, permission, site=target_site)

    command = body.to_command(kind, patient_key=key, expected_version=expected)
    return _result(_handle(ctx, caller, command, idempotency, authorize), response)


# -- routes ----------------------------------------------------------------------------------


@router.post("", status_code=201, responses=PROBLEMS, summary="Admit a new patient")
async def admit(
    body: m.AdmitBody,
    ctx: Ctx,
    caller: Caller,
    response: Response,
    idempotency: IdempotencyKey,
) -> m.CommandResult:
    return await in_thread(_admit, body, ctx, caller, response, idempotency)


def _admit(
    body: m.AdmitBody,
    ctx: ApiContext,
    caller: Principal,
    response: Response,
    idempotency: str | None,
) -> m.CommandResult:
    require(caller, Permission.ADMIT, site=body.site)
    command = body.to_command(c.Admit, patient_key=None, expected_version=None)
    result = _result(_handle(ctx, caller, command, idempotency), response)
    response.headers["Location"] = f"/v1/patients/{result.patient_key}"
    return result


@router.get("/{patient_key}", responses=PROBLEMS, summary="A patient's current state")
def read_patient(
    patient_key: PatientKey,
    ctx: Ctx,
    caller: Caller,
    purpose: Purpose,
    request: Request,
    response: Response,
) -> m.PatientView:
    events = _read_patient(ctx, request, caller, patient_key, purpose, "patient.read")
    state = ctx.app.service.load(patient_key)
    del events
    response.headers["ETag"] = etag(state.version)
    return patient_view(ctx, caller, state)


@router.get("/{patient_key}/timeline", responses=PROBLEMS, summary="Every event, with voids")
def timeline(
    patient_key: PatientKey,
    ctx: Ctx,
    caller: Caller,
    purpose: Purpose,
    request: Request,
    response: Response,
) -> m.Timeline:
    from continuum_projections.timeline import summarize

    events = _read_patient(ctx, request, caller, patient_key, purpose, "patient.timeline")
    voided = {
        str(getattr(event.data, "voided_event_id", ""))
        for event in events
        if event.event_type == "EventVoided"
    }
    version = events[-1].stream_version
    response.headers["ETag"] = etag(version)
    return m.Timeline(
        patient_key=patient_key,
        version=version,
        events=[
            m.TimelineEvent(
                event=event.to_json_dict(),
                summary=summarize(event),
                voided=str(event.event_id) in voided,
            )
            for event in events
        ],
    )


FHIR_JSON = "application/fhir+json"


@router.get(
    "/{patient_key}/fhir",
    responses={
        **PROBLEMS,
        200: {
            "description": "A FHIR R4 Bundle (type collection): EpisodeOfCare per episode, an "
            "Encounter per level stay, Observations for ratings and indicated level",
            "content": {FHIR_JSON: {"schema": {"type": "object"}}},
        },
    },
    response_class=JSONResponse,
    summary="FHIR R4 export",
)
def fhir_export(
    patient_key: PatientKey,
    ctx: Ctx,
    caller: Caller,
    purpose: Purpose,
    request: Request,
) -> Response:
    from continuum.adapters.fhir.export import patient_bundle

    events = _read_patient(ctx, request, caller, patient_key, purpose, "patient.fhir")
    bundle = patient_bundle(
        patient_key, events, ctx.app.policies, timestamp=ctx.app.service.clock()
    )
    return Response(
        content=bundle.model_dump_json(),
        media_type=FHIR_JSON,
        headers={"ETag": etag(events[-1].stream_version)},
    )


@router.post(
    "/{patient_key}/reassessments", status_code=201, responses=PROBLEMS, summary="Reassess"
)
async def reassess(
    patient_key: PatientKey,
    body: m.ReassessmentBody,
    ctx: Ctx,
    caller: Caller,
    response: Response,
    expected: ExpectedVersion,
    idempotency: IdempotencyKey,
) -> m.CommandResult:
    return await in_thread(
        run_command,
        ctx,
        caller,
        Permission.REASSESS,
        patient_key,
        body,
        c.RecordReassessment,
        expected=expected,
        idempotency=idempotency,
        response=response,
    )


@router.post(
    "/{patient_key}/transitions",
    status_code=201,
    responses=PROBLEMS,
    summary="Move to another level (step-down, step-up or lateral)",
)
async def transition(
    patient_key: PatientKey,
    body: m.TransitionBody,
    ctx: Ctx,
    caller: Caller,
    response: Response,
    expected: ExpectedVersion,
    idempotency: IdempotencyKey,
) -> m.CommandResult:
    return await in_thread(
        run_command,
        ctx,
        caller,
        Permission.TRANSITION,
        patient_key,
        body,
        c.Transition,
        expected=expected,
        idempotency=idempotency,
        response=response,
        target_site=body.site,
    )


@router.post(
    "/{patient_key}/attendance", status_code=201, responses=PROBLEMS, summary="Hours attended"
)
async def attend(
    patient_key: PatientKey,
    body: m.AttendanceBody,
    ctx: Ctx,
    caller: Caller,
    response: Response,
    expected: ExpectedVersion,
    idempotency: IdempotencyKey,
) -> m.CommandResult:
    return await in_thread(
        run_command,
        ctx,
        caller,
        Permission.ATTEND,
        patient_key,
        body,
        c.RecordAttendance,
        expected=expected,
        idempotency=idempotency,
        response=response,
    )


@router.post("/{patient_key}/discharges", status_code=201, responses=PROBLEMS, summary="Discharge")
async def discharge(
    patient_key: PatientKey,
    body: m.DischargeBody,
    ctx: Ctx,
    caller: Caller,
    response: Response,
    expected: ExpectedVersion,
    idempotency: IdempotencyKey,
) -> m.CommandResult:
    return await in_thread(
        run_command,
        ctx,
        caller,
        Permission.DISCHARGE,
        patient_key,
        body,
        c.Discharge,
        expected=expected,
        idempotency=idempotency,
        response=response,
    )


@router.post(
    "/{patient_key}/readmissions",
    status_code=201,
    responses=PROBLEMS,
    summary="Readmit: a new episode",
)
async def readmit(
    patient_key: PatientKey,
    body: m.ReadmitBody,
    ctx: Ctx,
    caller: Caller,
    response: Response,
    expected: ExpectedVersion,
    idempotency: IdempotencyKey,
) -> m.CommandResult:
    return await in_thread(
        run_command,
        ctx,
        caller,
        Permission.READMIT,
        patient_key,
        body,
        c.Readmit,
        expected=expected,
        idempotency=idempotency,
        response=response,
        target_site=body.site,
    )


@router.post(
    "/{patient_key}/voids",
    status_code=201,
    responses=PROBLEMS,
    summary="Void a mistaken event (a later event; nothing is deleted)",
)
async def void(
    patient_key: PatientKey,
    body: m.VoidBody,
    ctx: Ctx,
    caller: Caller,
    response: Response,
    expected: ExpectedVersion,
    idempotency: IdempotencyKey,
) -> m.CommandResult:
    return await in_thread(
        run_command,
        ctx,
        caller,
        Permission.VOID,
        patient_key,
        body,
        c.VoidEvent,
        expected=expected,
        idempotency=idempotency,
        response=response,
    )
