"""The composition root: wires settings to real adapters. Tests wire fakes instead."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from continuum.adapters.sql.database import create_database_engine, is_sqlite
from continuum.adapters.sql.migrate import ensure_ready
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.service import Clock, PatientService, utc_now
from continuum.domain.policy import PolicyRegistry
from continuum.settings import Settings


@dataclass
class App:
    settings: Settings
    engine: Engine
    store: SqlEventStore
    policies: PolicyRegistry
    service: PatientService

    def close(self) -> None:
        self.engine.dispose()


def bootstrap(settings: Settings, *, clock: Clock = utc_now, migrate: bool | None = None) -> App:
    """Build the application. The embedded SQLite default migrates itself on first use;
    PostgreSQL must be migrated explicitly with `continuum db upgrade`."""
    policies = PolicyRegistry.bundled(settings.policy, settings.policy_dirs)
    engine = create_database_engine(settings.database_url)
    try:
        if migrate is not False:
            auto = migrate if migrate is not None else is_sqlite(engine)
            ensure_ready(engine, auto_upgrade=auto)
    except BaseException:
        engine.dispose()
        raise
    store = SqlEventStore(engine)
    return App(settings, engine, store, policies, PatientService(store, policies, clock))
