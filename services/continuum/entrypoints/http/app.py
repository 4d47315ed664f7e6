"""The FastAPI application: wiring only. Routes call the same service layer as the CLI.

`create_app(ctx)` builds an app over a ready context (tests pass their own); `app_factory()`
builds everything from the environment (CONTINUUM_*) for `continuum serve` and its workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from continuum.adapters.sql.access_log import SqlAccessLog
from continuum.application.access import AccessAudit
from continuum.bootstrap import App, bootstrap
from continuum.entrypoints.http import problems
from continuum.entrypoints.http.context import ApiContext, Verifier
from continuum.entrypoints.http.deps import strict_query
from continuum.entrypoints.http.metrics import install as install_metrics
from continuum.entrypoints.http.middleware import RequestGuard
from continuum.entrypoints.http.routes import consents, operations, patients, reports
from continuum.entrypoints.web import PREFIX as CONSOLE
from continuum.entrypoints.web import install as install_console
from continuum.settings import Settings

DESCRIPTION = """\
care-continuum tracks patients in substance-use-disorder treatment through the continuum of
care. Every change is an event resting on a dated reassessment; nothing is ever deleted.

Authenticate with a bearer JWT. Errors are RFC 9457 problem details. Changes take `If-Match`
(the patient's ETag) for optimistic concurrency and `Idempotency-Key` for safe retries. Every
read of patient-level data is recorded in the access log with its purpose (`X-Purpose-Of-Use`).
"""


def build_context(
    application: App, verifier: Verifier, *, read_model_engine: object | None = None
) -> ApiContext:
    from sqlalchemy import Engine

    from continuum_projections.readmodel import ReadModel
    from continuum_projections.reports import Capacity

    settings = application.settings
    engine = read_model_engine if isinstance(read_model_engine, Engine) else application.engine
    model = ReadModel(engine)
    model.create()
    capacity = Capacity.load(settings.capacity_file) if settings.capacity_file else None
    access_log = SqlAccessLog(application.engine)
    from continuum.adapters.sql.disclosures import SqlDisclosureRecord

    policy = application.policies.default
    return ApiContext(
        app=application,
        verifier=verifier,
        access_log=access_log,
        disclosures=SqlDisclosureRecord(application.engine),
        audit=AccessAudit(access_log, channel="http"),
        read_model=model,
        capacity=capacity,
        level_order=[level.code for level in policy.levels],
    )


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="care-continuum",
        version="1",
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        dependencies=[Depends(strict_query)],
        # Operators get Prometheus metrics (GET /metrics). FastAPI's OpenTelemetry hooks are
        # off: with no provider configured they still looked one up on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.ctx = ctx
    problems.install(app)
    app.include_router(patients.router)
    app.include_router(consents.router)
    app.include_router(reports.router)
    app.include_router(operations.router)
    install_metrics(app, ctx)
    install_console(app)
    app.add_middleware(
        RequestGuard,
        max_body_bytes=ctx.app.settings.api_max_body_bytes,
        form_paths=(f"{CONSOLE}/",),
    )
    return app


def app_factory() -> FastAPI:
    """For uvicorn (`--factory`): everything from the environment, closed on shutdown."""
    from continuum.adapters.auth.tokens import verifier_from_settings

    settings = Settings()
    application = bootstrap(settings)
    read_engine = None
    if settings.read_model_url:
        from continuum.adapters.sql.database import create_database_engine

        read_engine = create_database_engine(settings.read_model_url)
    ctx = build_context(
        application, verifier_from_settings(settings), read_model_engine=read_engine
    )
    app = create_app(ctx)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        application.close()
        if read_engine is not None:
            read_engine.dispose()

    app.router.lifespan_context = lifespan
    return app
