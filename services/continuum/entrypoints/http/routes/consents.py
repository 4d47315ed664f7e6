"""Consent and disclosure: a patient's consents to disclose to recipient organizations (42 CFR
Part 2), and the record of what was disclosed under them (docs/consent.md).

Giving and revoking are commands on the patient's stream like any other; the disclosure
publisher (`continuum disclose`) reads them from the log. Reading a patient's consents and the
disclosure record is patient-level data, so each read is recorded in the access log.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from continuum.application.access import AccessDenied, Permission, require, require_any_site
from continuum.domain import commands as c
from continuum.domain.patient import check_org_code
from continuum.entrypoints.http import models as m
from continuum.entrypoints.http.deps import (
    KEY_PATTERN,
    Caller,
    Ctx,
    ExpectedVersion,
    IdempotencyKey,
    Purpose,
    etag,
)
from continuum.entrypoints.http.routes.operations import MAX_POSITION
from continuum.entrypoints.http.routes.patients import PROBLEMS, _audit, run_command, sites_of
from continuum.entrypoints.http.threads import in_thread
from continuum_events.codes import PatientKey

router = APIRouter(tags=["consent"])


@router.post(
    "/v1/patients/{patient_key}/consents",
    status_code=201,
    responses=PROBLEMS,
    summary="Record a consent to disclose to one organization",
)
async def give_consent(
    patient_key: PatientKey,
    body: m.ConsentBody,
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
        Permission.MANAGE_CONSENT,
        patient_key,
        body,
        c.GiveConsent,
        expected=expected,
        idempotency=idempotency,
        response=response,
    )


@router.post(
    "/v1/patients/{patient_key}/consent-revocations",
    status_code=201,
    responses=PROBLEMS,
    summary="Record that the patient revoked a consent",
)
async def revoke_consent(
    patient_key: PatientKey,
    body: m.RevocationBody,
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
        Permission.MANAGE_CONSENT,
        patient_key,
        body,
        c.RevokeConsent,
        expected=expected,
        idempotency=idempotency,
        response=response,
    )


@router.get(
    "/v1/patients/{patient_key}/consents",
    responses=PROBLEMS,
    summary="A patient's consents, with their status today",
)
def list_consents(
    patient_key: PatientKey,
    ctx: Ctx,
    caller: Caller,
    purpose: Purpose,
    request: Request,
    response: Response,
) -> m.ConsentList:
    require(caller, Permission.READ_CONSENT)
    ctx.app.store.sequence()
    events = ctx.app.service.history(patient_key)  # 404 before any access is recorded
    try:
        require_any_site(caller, sites_of(events), Permission.READ_CONSENT)
    except AccessDenied:
        _audit(ctx, request, caller, "patient.consents", patient_key, purpose, allowed=False)
        raise
    state = ctx.app.service.load(patient_key)
    today = ctx.app.service.clock().date()
    consents = [
        m.ConsentView(
            consent_id=consent.consent_id,
            recipient_org=consent.recipient_org,
            purposes=[purpose.value for purpose in consent.purposes],
            given_on=consent.given_on,
            expires_on=consent.expires_on,
            document_ref=consent.document_ref,
            event_id=consent.event_id,
            status=consent.status(today),
            revoked_on=consent.revoked_on,
        )
        for consent in state.consents.values()
    ]
    _audit(
        ctx,
        request,
        caller,
        "patient.consents",
        patient_key,
        purpose,
        allowed=True,
        records=len(consents),
    )
    response.headers["ETag"] = etag(state.version)
    return m.ConsentList(patient_key=patient_key, version=state.version, consents=consents)


@router.get(
    "/v1/disclosures",
    responses=PROBLEMS,
    summary="The disclosure record: which event went to which organization, under which consent",
)
def disclosures(
    ctx: Ctx,
    caller: Caller,
    purpose: Purpose,
    request: Request,
    org: Annotated[
        str | None, Query(max_length=63, description="A recipient organization's code.")
    ] = None,
    patient_key: Annotated[str | None, Query(pattern=KEY_PATTERN)] = None,
    after_id: Annotated[int, Query(ge=0, le=MAX_POSITION)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> m.DisclosurePage:
    require(caller, Permission.READ_DISCLOSURES)
    if org is not None:
        check_org_code(org)
    found = ctx.disclosures.query(org=org, patient_key=patient_key, after_id=after_id, limit=limit)
    views = [m.DisclosureView.model_validate(row, from_attributes=True) for row in found]
    _audit(
        ctx,
        request,
        caller,
        "disclosures.read",
        patient_key,
        purpose,
        allowed=True,
        records=len(views),
    )
    return m.DisclosurePage(
        disclosures=views, next_after_id=views[-1].id if len(views) == limit else None
    )
