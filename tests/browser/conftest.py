"""The web console under a real browser: the real app (API and console) served by uvicorn on
127.0.0.1, over a SQLite file or a fresh PostgreSQL schema, with the projection worker
following the store in a thread (as `continuum serve --project` does), driven by Playwright
with Debian's chromium (/usr/bin/chromium; .ci/run installs it).

Screenshots of every page go to tests/browser/artifacts/<backend>/ (gitignored); look at them.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import Engine

from continuum.adapters.auth.tokens import DevIssuer
from continuum.adapters.memory import InMemoryEventStore
from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.service import CommandContext, PatientService
from continuum.bootstrap import App
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum.entrypoints.http.app import build_context, create_app
from continuum.entrypoints.http.context import ApiContext
from continuum.settings import Settings
from continuum_events import (
    Actor,
    ActorRole,
    AgeGroup,
    DischargeReason,
    Disposition,
    VarianceReason,
    VoidReason,
)
from continuum_projections.runners import StoreRunner
from tests.support import fresh_pg_schema

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"


def ago(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)


def ratings(digits: str) -> dict[str, str]:
    return {str(i + 1): d for i, d in enumerate(digits)}


def assessment(digits: str, hours: float | None = None) -> c.AssessmentInput:
    return c.AssessmentInput(
        instrument="asam-crit", assessor_id="clin-7", ratings=ratings(digits), hours_scheduled=hours
    )


@dataclass
class Seeded:
    """The synthetic cohort: keys by role in the story, and what the census must show."""

    keys: dict[str, str] = field(default_factory=dict)
    #: (level, site) -> patients in care, counted as the seed made them.
    census: dict[tuple[str, str], int] = field(default_factory=dict)

    def placed(self, level: str, site: str, n: int = 1) -> None:
        self.census[(level, site)] = self.census.get((level, site), 0) + n


def seed(ctx: ApiContext) -> Seeded:
    """Synthetic patients (names are made up), through the service layer as any caller would,
    plus one legacy record whose transition rests on a stale reassessment."""
    service = ctx.app.service
    who = CommandContext(actor=Actor(id="seed-clin", role=ActorRole.CLINICIAN))
    out = Seeded()

    def admit(
        level: str, site: str, days: float, digits: str, hours: float | None = None, **extra: Any
    ) -> str:
        result = service.handle(
            c.Admit(
                level=level,
                site=site,
                age_group=AgeGroup.ADULT,
                occurred_at=ago(days),
                assessment=assessment(digits, hours),
                **extra,
            ),
            who,
        )
        return result.stream_id

    # The patient the story follows: in 3.5 for 20 days, last assessed at admission (overdue).
    out.keys["main"] = admit(
        "3.5",
        "site-a",
        20,
        "001040",
        identity=c.Identity(given_name="Avery", family_name="Testcase", birth_date="1990-04-02"),
    )
    out.placed("3.5", "site-a")
    # In 3.7, reassessed recently; one mistaken reassessment voided (struck through).
    kept = admit(
        "3.7",
        "site-a",
        45,
        "003000",
        identity=c.Identity(given_name="Jordan", family_name="Sample", birth_date="1985-11-30"),
    )
    mistaken = service.handle(
        c.RecordReassessment(patient_key=kept, occurred_at=ago(5), assessment=assessment("003100")),
        who,
    ).events[0]
    service.handle(
        c.VoidEvent(
            patient_key=kept,
            event_id=mistaken.event_id,
            reason=VoidReason.ENTERED_IN_ERROR,
            occurred_at=ago(4.9),
        ),
        who,
    )
    service.handle(
        c.RecordReassessment(patient_key=kept, occurred_at=ago(3), assessment=assessment("003000")),
        who,
    )
    out.keys["voided"] = kept
    out.placed("3.7", "site-a")
    # Another site's patient: counted in the census, out of reach of site-a's case manager.
    out.keys["other_site"] = admit("3.5", "site-b", 10, "000040")
    out.placed("3.5", "site-b")
    # A clean step-down (3.3 -> 3.1 as indicated, fresh reassessment): no audit flag.
    clean = admit("3.3", "site-a", 30, "000030", variance_reason=VarianceReason.CLINICAL_OVERRIDE)
    service.handle(
        c.RecordReassessment(
            patient_key=clean, occurred_at=ago(3), assessment=assessment("000030", 10)
        ),
        who,
    )
    service.handle(c.Transition(patient_key=clean, occurred_at=ago(2), to_level="3.1"), who)
    out.keys["clean"] = clean
    out.placed("3.1", "site-a")
    # Admitted and discharged long ago: in the daily census history, not in today's census.
    gone = admit("2.1", "site-a", 80, "000200", 12, authorization_ref="auth-1")
    service.handle(
        c.Discharge(
            patient_key=gone,
            occurred_at=ago(50),
            reason=DischargeReason.COMPLETED,
            disposition=Disposition.HOME,
        ),
        who,
    )
    # A legacy record (another path, e.g. a migration from an older system): a step-down
    # resting on an 11-day-old reassessment, which the service itself would refuse.
    out.keys["legacy"] = legacy(ctx)
    out.placed("2.1", "site-a")
    return out


def legacy(ctx: ApiContext) -> str:
    scratch = InMemoryEventStore()
    service = PatientService(scratch, ctx.app.policies)
    who = CommandContext(actor=Actor(id="legacy-import", role=ActorRole.INTEGRATION))
    key = service.handle(
        c.Admit(
            level="3.5",
            site="site-a",
            age_group=AgeGroup.ADULT,
            occurred_at=ago(25),
            assessment=assessment("001040"),
        ),
        who,
    ).stream_id
    service.handle(
        c.RecordReassessment(
            patient_key=key, occurred_at=ago(20), assessment=assessment("000200", 12)
        ),
        who,
    )
    service.handle(c.Transition(patient_key=key, occurred_at=ago(18), to_level="2.1"), who)
    events = [e.model_copy(update={"position": None}) for e in scratch.read_stream(key)]
    move = events[-1]
    moved_at = ago(9)
    age = (moved_at - events[1].occurred_at).total_seconds() / 86400
    data = move.data.model_copy(update={"reassessment_age_days": round(age, 4)})
    events[-1] = move.model_copy(update={"occurred_at": moved_at, "data": data})
    ctx.app.store.append(key, 0, events)
    return key


@dataclass
class Console:
    base_url: str
    ctx: ApiContext
    issuer: DevIssuer
    seeded: Seeded
    backend: str
    artifacts: Path

    def token(self, role: str, sites: tuple[str, ...] = ("site-a",)) -> str:
        return self.issuer.issue(
            f"user-{role}", role, sites=list(sites), ttl_seconds=3600, organization=None
        )

    def caught_up(self, timeout: float = 20.0) -> None:
        """Wait until the projection worker has applied every committed event."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head = self.ctx.app.store.head_position()
            if self.ctx.read_model.checkpoint("store") >= head:
                return
            time.sleep(0.1)
        raise AssertionError("the projection worker did not catch up")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(
    engine: Engine, url: str, tmp_path: Path, policies: PolicyRegistry, backend: str
) -> Iterator[Console]:
    capacity = tmp_path / "capacity.toml"
    capacity.write_text(
        '[sites.site-a]\n"3.5" = 2\n"3.7" = 4\n"2.1" = 10\n[sites.site-b]\n"3.5" = 1\n',
        encoding="utf-8",
    )
    settings = Settings(
        database_url=url,
        dev_issuer_key_file=tmp_path / "dev-issuer.pem",
        capacity_file=capacity,
    )
    store = SqlEventStore(engine)
    application = App(settings, engine, store, policies, PatientService(store, policies))
    issuer = DevIssuer.load_or_create(settings.dev_issuer_key_file, audience="care-continuum")
    ctx = build_context(application, issuer.verifier())
    seeded = seed(ctx)
    runner = StoreRunner(store, ctx.read_model, policies)
    runner.run()
    stop = threading.Event()
    projector = threading.Thread(
        target=runner.follow, args=(stop,), kwargs={"interval_s": 0.1}, daemon=True
    )
    projector.start()
    port = _free_port()
    config = uvicorn.Config(
        create_app(ctx),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ws="none",
    )
    server = uvicorn.Server(config)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not serving.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    artifacts = ARTIFACTS / backend
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        yield Console(
            base_url=f"http://127.0.0.1:{port}",
            ctx=ctx,
            issuer=issuer,
            seeded=seeded,
            backend=backend,
            artifacts=artifacts,
        )
    finally:
        server.should_exit = True
        serving.join(timeout=15)
        stop.set()
        projector.join(timeout=15)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def console(
    request: pytest.FixtureRequest, tmp_path: Path, policies: PolicyRegistry
) -> Iterator[Console]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'console.sqlite3'}"
        engine = create_database_engine(url)
        upgrade(engine)
        try:
            yield from _serve(engine, url, tmp_path, policies, "sqlite")
        finally:
            engine.dispose()
        return
    pg_url: str = request.getfixturevalue("pg_url")
    with fresh_pg_schema(pg_url, prefix="console") as engine:
        yield from _serve(engine, pg_url, tmp_path, policies, "postgres")


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`; "
            ".ci/run does) to run the browser tests"
        )
    from playwright.sync_api import sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this session's screenshots only

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield browser
        finally:
            browser.close()
