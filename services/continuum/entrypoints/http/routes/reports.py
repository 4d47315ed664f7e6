"""Census (current, as of, in care at, daily), the patient list, the step-down audit trail and
outcome metrics: all read from the projections' read models (continuum_projections)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select

from continuum.application.access import Permission, require
from continuum.entrypoints.http import models as m
from continuum.entrypoints.http.deps import (
    CODE_PATTERN,
    KEY_PATTERN,
    LEVEL_PATTERN,
    Caller,
    Ctx,
    Purpose,
)
from continuum.entrypoints.http.routes.patients import PROBLEMS
from continuum.entrypoints.projections_cli import TrailFormat, parse_moment, render_trail
from continuum_projections import readmodel as rm
from continuum_projections import reports
from continuum_projections.readmodel import utc

router = APIRouter(prefix="/v1", tags=["reports"])

Moment = Annotated[
    str | None,
    Query(description="ISO 8601 date or date-time (UTC when no offset is given)."),
]


@router.get("/census", responses=PROBLEMS, summary="Active patients by level, site, program")
def census(
    ctx: Ctx,
    caller: Caller,
    as_of: Annotated[
        str | None,
        Query(description="The census as the log stood at this recorded time (ISO 8601)."),
    ] = None,
    clinical: Annotated[
        bool,
        Query(description="With as_of: who was in care at that clinical time, as known now."),
    ] = False,
) -> JSONResponse:
    require(caller, Permission.READ_AGGREGATES)
    moment = parse_moment(as_of, field="as_of")
    with ctx.read_engine.connect() as conn:
        if moment is None:
            snapshot = reports.current_census(
                conn, capacity=ctx.capacity, level_order=ctx.level_order
            )
        elif clinical:
            snapshot = reports.census_in_care_at(
                conn, moment, capacity=ctx.capacity, level_order=ctx.level_order
            )
        else:
            snapshot = reports.census_as_of(
                conn, moment, capacity=ctx.capacity, level_order=ctx.level_order
            )
    return JSONResponse(snapshot.to_json_dict())


@router.get("/census/daily", responses=PROBLEMS, summary="Midnight census per level and day")
def daily_census(
    ctx: Ctx,
    caller: Caller,
    days: Annotated[int, Query(ge=1, le=3660)] = 90,
    until: Moment = None,
) -> JSONResponse:
    require(caller, Permission.READ_AGGREGATES)
    last = parse_moment(until, field="until")
    end = (last or dt.datetime.now(dt.UTC)).date()
    with ctx.read_engine.connect() as conn:
        history = reports.daily_census(conn, end - dt.timedelta(days=days - 1), end)
    return JSONResponse(history.to_json_dict())


@router.get("/outcomes", responses=PROBLEMS, summary="Length of stay and outcome metrics")
def outcomes(
    ctx: Ctx,
    caller: Caller,
    start: Annotated[str | None, Query(alias="from")] = None,
    end: Annotated[str | None, Query(alias="to")] = None,
) -> JSONResponse:
    require(caller, Permission.READ_AGGREGATES)
    first = parse_moment(start, field="from")
    last = parse_moment(end, field="to", end_of_day=True)
    with ctx.read_engine.connect() as conn:
        metrics = reports.outcome_metrics(conn, first, last, level_order=ctx.level_order)
    return JSONResponse(metrics.to_json_dict())


@router.get(
    "/audit-trail",
    responses={
        **PROBLEMS,
        200: {"content": {"application/json": {}, "text/csv": {}, "text/html": {}}},
    },
    summary="The step-down audit trail: one row per transition and readmission, with flags",
)
def audit_trail(
    ctx: Ctx,
    caller: Caller,
    purpose: Purpose,
    request: Request,
    start: Annotated[str | None, Query(alias="from")] = None,
    end: Annotated[str | None, Query(alias="to")] = None,
    flagged: bool = False,
    site: Annotated[str | None, Query(pattern=CODE_PATTERN)] = None,
    patient_key: Annotated[str | None, Query(pattern=KEY_PATTERN)] = None,
    fmt: Annotated[TrailFormat, Query(alias="format")] = TrailFormat.JSON,
) -> Response:
    require(caller, Permission.READ_AUDIT_TRAIL)
    first = parse_moment(start, field="from")
    last = parse_moment(end, field="to", end_of_day=True)
    with ctx.read_engine.connect() as conn:
        rows = reports.audit_trail(conn, first, last, flagged_only=flagged)
    allowed = caller.site_filter()
    rows = [
        row
        for row in rows
        if (allowed is None or row["to_site"] in allowed or row["from_site"] in allowed)
        and (site is None or site in (row["to_site"], row["from_site"]))
        and (patient_key is None or row["patient_key"] == patient_key)
    ]
    ctx.audit.record(
        caller,
        action="audit_trail.read",
        resource=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
        purpose=purpose,
        patient_key=patient_key,
        request_id=getattr(request.state, "request_id", None),
        records=len(rows),
    )
    if fmt is TrailFormat.CSV:
        return Response(
            render_trail(rows, fmt),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="audit-trail.csv"'},
        )
    if fmt is TrailFormat.HTML:
        return Response(
            render_trail(rows, fmt, title="Step-down audit trail"), media_type="text/html"
        )
    return JSONResponse({"rows": [_plain(row) for row in rows], "total": len(rows)})


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}


@router.get("/patients", responses=PROBLEMS, summary="Patients, filtered (from the read model)")
def list_patients(
    ctx: Ctx,
    caller: Caller,
    purpose: Purpose,
    request: Request,
    level: Annotated[str | None, Query(pattern=LEVEL_PATTERN)] = None,
    site: Annotated[str | None, Query(pattern=CODE_PATTERN)] = None,
    active: bool = True,
    overdue: Annotated[
        bool | None, Query(description="Only patients whose latest assessment is stale.")
    ] = None,
    min_days_in_level: Annotated[int | None, Query(ge=0, le=36500)] = None,
    key: Annotated[
        str | None, Query(pattern=r"^pk(?:-[a-z2-7]{0,20})?$", description="Patient key prefix.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> m.PatientList:
    require(caller, Permission.READ_PATIENT)
    p = rm.patients
    now = dt.datetime.now(dt.UTC)
    window = dt.timedelta(days=ctx.app.policies.default.reassessment_window_days)
    query = select(p).where(p.c.active.is_(active))
    if level is not None:
        query = query.where(p.c.level == level)
    if site is not None:
        query = query.where(p.c.site == site)
    allowed = caller.site_filter()
    if allowed is not None:
        query = query.where(p.c.site.in_(sorted(allowed)))
    if overdue is True:
        query = query.where(
            (p.c.last_assessed_at.is_(None)) | (p.c.last_assessed_at < now - window)
        )
    elif overdue is False:
        query = query.where(p.c.last_assessed_at >= now - window)
    if min_days_in_level is not None:
        query = query.where(p.c.placed_at <= now - dt.timedelta(days=min_days_in_level))
    if key is not None:
        query = query.where(p.c.patient_key.startswith(key, autoescape=True))
    with ctx.read_engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        rows = (
            conn.execute(query.order_by(p.c.placed_at, p.c.patient_key).limit(limit).offset(offset))
            .mappings()
            .all()
        )
        position = conn.execute(select(func.max(p.c.position))).scalar() or 0
    show_identity = caller.sees_identity()
    patients = []
    for row in rows:
        placed = utc(row["placed_at"])
        assessed = utc(row["last_assessed_at"])
        identity = None
        if show_identity:
            found = ctx.app.store.identity(row["patient_key"])
            identity = m.IdentityView(**found.model_dump()) if found else None
        patients.append(
            m.PatientRow(
                patient_key=row["patient_key"],
                state=row["state"],
                active=row["active"],
                level=row["level"],
                site=row["site"],
                program=row["program"],
                age_group=row["age_group"],
                placed_at=placed,
                days_in_level=None if placed is None else max(0, (now - placed).days),
                last_assessed_at=assessed,
                reassessment_overdue=assessed is None or assessed < now - window,
                identity=identity,
            )
        )
    ctx.audit.record(
        caller,
        action="patients.list",
        resource=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
        purpose=purpose,
        request_id=getattr(request.state, "request_id", None),
        records=len(patients),
    )
    return m.PatientList(patients=patients, total=int(total), projection_position=int(position))
