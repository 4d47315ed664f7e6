"""The HTTP API under test: the real FastAPI app over a real SQLite or PostgreSQL store, with
tokens from the real development issuer (RS256). Requests go through Starlette's TestClient
(in-process ASGI: the app, middleware and exception handlers run exactly as under uvicorn)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from continuum.adapters.auth.tokens import DevIssuer
from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.service import PatientService
from continuum.bootstrap import App
from continuum.domain.policy import PolicyRegistry
from continuum.entrypoints.http.app import build_context, create_app
from continuum.entrypoints.http.context import ApiContext
from continuum.settings import Settings
from tests.support import fresh_pg_schema


@dataclass
class Api:
    client: TestClient
    ctx: ApiContext
    issuer: DevIssuer
    engine: Engine
    tokens: dict[tuple[Any, ...], str] = field(default_factory=dict)

    def token(
        self,
        role: str,
        sites: tuple[str, ...] = ("site-a",),
        *,
        subject: str | None = None,
        organization: str | None = None,
    ) -> str:
        key = (role, sites, subject, organization)
        if key not in self.tokens:
            self.tokens[key] = self.issuer.issue(
                subject=subject or f"user-{role}",
                role=role,
                sites=list(sites),
                organization=organization,
                ttl_seconds=3600,
            )
        return self.tokens[key]

    def auth(
        self, role: str, sites: tuple[str, ...] = ("site-a",), **headers: str
    ) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, sites)}", **headers}

    def head(self) -> int:
        self.ctx.app.store.sequence()
        return self.ctx.app.store.head_position()

    def project(self) -> None:
        from continuum_projections.runners import StoreRunner

        StoreRunner(self.ctx.app.store, self.ctx.read_model, self.ctx.app.policies).run()


def _api(
    engine: Engine, url: str, tmp_path: Path, policies: PolicyRegistry, **settings: Any
) -> Api:
    config = Settings(database_url=url, dev_issuer_key_file=tmp_path / "dev-issuer.pem", **settings)
    store = SqlEventStore(engine)
    application = App(config, engine, store, policies, PatientService(store, policies))
    issuer = DevIssuer.load_or_create(tmp_path / "dev-issuer.pem", audience=config.auth_audience)
    ctx = build_context(application, issuer.verifier())
    client = TestClient(create_app(ctx), raise_server_exceptions=False)
    return Api(client=client, ctx=ctx, issuer=issuer, engine=engine)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request: pytest.FixtureRequest, tmp_path: Path, policies: PolicyRegistry) -> Iterator[Api]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'api.sqlite3'}"
        engine = create_database_engine(url)
        upgrade(engine)
        try:
            yield _api(engine, url, tmp_path, policies)
        finally:
            engine.dispose()
        return
    pg_url: str = request.getfixturevalue("pg_url")
    with fresh_pg_schema(pg_url, prefix="api") as engine:
        yield _api(engine, pg_url, tmp_path, policies)


@pytest.fixture
def sqlite_api(tmp_path: Path, policies: PolicyRegistry) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'api.sqlite3'}"
    engine = create_database_engine(url)
    upgrade(engine)
    try:
        yield _api(engine, url, tmp_path, policies)
    finally:
        engine.dispose()


def days_ago(n: float) -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(days=n)).isoformat()


def assessment(ratings: str = "001040", hours: float | None = None) -> dict[str, Any]:
    """Six dimension ratings as a string of digits (dimension 1 first)."""
    body: dict[str, Any] = {
        "instrument": "asam-crit",
        "assessor_id": "clin-7",
        "ratings": {str(i + 1): r for i, r in enumerate(ratings)},
    }
    if hours is not None:
        body["hours_scheduled"] = hours
    return body


def admit_body(
    site: str = "site-a", level: str = "3.5", days: float = 20, **extra: Any
) -> dict[str, Any]:
    return {
        "level": level,
        "site": site,
        "age_group": "adult",
        "occurred_at": days_ago(days),
        "assessment": assessment(),
        **extra,
    }
