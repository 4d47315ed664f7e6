"""Auditors' log export and access log; liveness and readiness."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import text

from continuum.adapters.sql.migrate import current_revision, head_revision
from continuum.application.access import Permission, require
from continuum.entrypoints.http import models as m
from continuum.entrypoints.http.deps import (
    KEY_PATTERN,
    Caller,
    Ctx,
    Purpose,
)
from continuum.entrypoints.http.routes.patients import PROBLEMS

router = APIRouter(tags=["operations"])

EXPORT_PAGE = 2_000
#: Positions and ids are 64-bit in the database.
MAX_POSITION = 2**62


@router.get(
    "/v1/log/export",
    responses={**PROBLEMS, 200: {"content": {"application/x-ndjson": {}}}},
    summary="The event log as JSON lines, in global order (auditors)",
    response_class=StreamingResponse,
)
def export_log(
    ctx: Ctx,
    caller: Caller,
    purpose: Purpose,
    request: Request,
    after: Annotated[
        int, Query(ge=0, le=MAX_POSITION, description="Export events after this position.")
    ] = 0,
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_POSITION, description="At most this many events.")
    ] = None,
) -> StreamingResponse:
    require(caller, Permission.EXPORT_LOG)
    store = ctx.app.store
    store.sequence()
    head = store.head_position()
    if limit is not None:
        head = min(head, after + limit)
    # The export is recorded before the first byte leaves: who, and the exact range.
    ctx.audit.record(
        caller,
        action="log.export",
        resource=f"/v1/log/export?after={after}&through={head}",
        purpose=purpose,
        request_id=getattr(request.state, "request_id", None),
        records=max(0, head - after),
    )

    def lines() -> Iterator[bytes]:
        position = after
        while position < head:
            page = store.read_wire(position, min(EXPORT_PAGE, head - position))
            if not page:
                return
            for wire in page:
                yield wire.value + b"\n"
            position = page[-1].position

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"X-Log-Head": str(head), "X-Log-After": str(after)},
    )


@router.get("/v1/access-log", responses=PROBLEMS, summary="Who read which patient data, when, why")
def access_log(
    ctx: Ctx,
    caller: Caller,
    patient_key: Annotated[str | None, Query(pattern=KEY_PATTERN)] = None,
    subject: Annotated[
        str | None, Query(pattern=r"^[^\x00-\x1f]{1,128}$", description="A token subject.")
    ] = None,
    since: Annotated[str | None, Query()] = None,
    until: Annotated[str | None, Query()] = None,
    after_id: Annotated[int, Query(ge=0, le=MAX_POSITION)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> m.AccessLogPage:
    from continuum.entrypoints.projections_cli import parse_moment

    require(caller, Permission.READ_ACCESS_LOG)
    entries = ctx.access_log.query(
        patient_key=patient_key,
        subject=subject,
        since=parse_moment(since, field="since"),
        until=parse_moment(until, field="until", end_of_day=True),
        after_id=after_id,
        limit=limit,
    )
    views = [m.AccessEntryView.model_validate(entry, from_attributes=True) for entry in entries]
    return m.AccessLogPage(
        entries=views, next_after_id=views[-1].id if len(views) == limit else None
    )


@router.get("/health/live", tags=["health"], summary="The process answers")
def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/health/ready",
    tags=["health"],
    summary="Database reachable and migrated; relay and projection lag",
    responses={503: {"model": m.Readiness}},
)
def ready(ctx: Ctx) -> JSONResponse:
    problems: list[str] = []
    readiness = m.Readiness(ready=False, database="unreachable")
    try:
        with ctx.app.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        readiness.database = "ok"
        readiness.schema_revision = current_revision(ctx.app.engine)
        if readiness.schema_revision != head_revision():
            problems.append(
                f"schema at {readiness.schema_revision}, expected {head_revision()}: "
                "run continuum db upgrade"
            )
        store = ctx.app.store
        head = store.head_position()
        readiness.head_position = head
        from continuum.adapters.sql.store import SqlCheckpoints

        readiness.relay_lag = max(
            0, head - SqlCheckpoints(ctx.app.engine).get(f"relay:{ctx.app.settings.events_topic}")
        )
        readiness.projection_source = source = ctx.read_model.source()
        if source is not None and source.startswith("kafka:"):
            # Fed from the topic by a consumer group: the lag is the group's, per partition
            # (`continuum doctor`, /metrics), not a distance from the store's head.
            return _readiness(readiness, problems)
        readiness.projection_lag = max(0, head - ctx.read_model.checkpoint("store"))
        limit = ctx.app.settings.api_max_projection_lag
        if readiness.projection_lag > limit:
            problems.append(
                f"projections are {readiness.projection_lag} events behind (limit {limit}): "
                "is `continuum project --follow` running?"
            )
    except Exception as exc:  # readiness reports every failure instead of raising
        problems.append(f"database: {type(exc).__name__}: {str(exc)[:200]}")
    return _readiness(readiness, problems)


def _readiness(readiness: m.Readiness, problems: list[str]) -> JSONResponse:
    readiness.problems = problems
    readiness.ready = not problems
    return JSONResponse(readiness.model_dump(mode="json"), status_code=200 if not problems else 503)
