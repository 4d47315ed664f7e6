"""Engines for the two supported databases, with one code path above them.

SQLite (the embedded default): WAL journal, foreign keys on, and writes begin with
BEGIN IMMEDIATE so that a writer takes the database lock up front instead of failing to upgrade
it midway. PostgreSQL: psycopg 3.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from continuum.domain.errors import InvalidInput

BEGIN_MODE = "continuum_begin"


def normalize_url(url: str) -> str:
    """Accept postgres://, postgresql:// and sqlite:/// URLs; pick the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidInput(
            f"database URL {url!r} is not a valid URL: {exc}", field="CONTINUUM_DATABASE_URL"
        ) from exc
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+pysqlite")
    else:
        raise InvalidInput(
            f"database {backend!r} is not supported; use sqlite:///PATH or postgresql://...",
            field="CONTINUUM_DATABASE_URL",
        )
    return parsed.render_as_string(hide_password=False)


def create_database_engine(
    url: str, *, pool_size: int = 10, echo: bool = False, schema: str | None = None
) -> Engine:
    """An engine for `url`. `schema` (PostgreSQL only) puts every table in that schema."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 60})
        _configure_sqlite(engine)
        return engine
    connect_args = {"options": f"-csearch_path={schema}"} if schema else {}
    return create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs a round trip per checkout. A connection found dead is
        # invalidated by SQLAlchemy and the failed command can be retried.
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args=connect_args,
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to the "begin" hook below (pysqlite's own is wrong for us).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")
        _enter_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(BEGIN_MODE, "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _enter_wal(cursor: Any, patience: float = 60.0) -> None:
    """Switch a connection to the WAL journal. On a new database file, several connections
    opening at once race to convert it, and SQLite answers the losers "database is locked" at
    once instead of waiting on the busy timeout: retry those for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
