"""Read-only looks at the event store's and the read models' databases for `continuum doctor`
(the ports in continuum.application.doctor). Nothing here writes: the head is the last
sequenced position, and a missing table means "not there yet", not an error to repair."""

from __future__ import annotations

from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.engine import make_url

from continuum.adapters.sql import tables as t
from continuum.adapters.sql.database import create_database_engine, normalize_url
from continuum.adapters.sql.migrate import SCRIPT_LOCATION, current_revision


def _with_connect_timeout(url: str, timeout_s: float) -> str:
    """PostgreSQL gives up connecting after `timeout_s` (libpq's connect_timeout)."""
    normalized = normalize_url(url)
    parsed = make_url(normalized)
    if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query:
        return normalized
    seconds = str(max(1, round(timeout_s)))
    return parsed.update_query_dict({"connect_timeout": seconds}).render_as_string(
        hide_password=False
    )


def known_revisions() -> frozenset[str]:
    """Every schema revision this release's migrations know."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(SCRIPT_LOCATION)
    return frozenset(rev.revision for rev in scripts.walk_revisions())


def safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable URL)"


class _Lazy:
    """An engine made on first use, so that a malformed URL is reported by the check."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._engine: Engine | None = None

    @property
    def where(self) -> str:
        return safe_url(self.url)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_database_engine(
                _with_connect_timeout(self.url, self.timeout_s), pool_size=1
            )
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


class SqlDatabaseProbe(_Lazy):
    @property
    def auto_migrates(self) -> bool:
        return make_url(normalize_url(self.url)).get_backend_name() == "sqlite"

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def schema_revision(self) -> str | None:
        return current_revision(self.engine)

    def head_position(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.coalesce(func.max(t.event_log.c.position), 0))) or 0)

    def checkpoint(self, name: str) -> int | None:
        with self.engine.connect() as conn:
            value = conn.scalar(
                select(t.checkpoints.c.position).where(t.checkpoints.c.name == name)
            )
        return None if value is None else int(value)


class SqlReadModelProbe(_Lazy):
    def source(self) -> str | None:
        from continuum_projections.readmodel import meta

        if not inspect(self.engine).has_table(meta.name):
            return None
        with self.engine.connect() as conn:
            value = conn.scalar(select(meta.c.value).where(meta.c.key == "source"))
        return None if value is None else str(value)

    def checkpoints(self, prefix: str) -> dict[str, int]:
        from continuum_projections.readmodel import checkpoints

        if not inspect(self.engine).has_table(checkpoints.name):
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(checkpoints.c.name, checkpoints.c.position).where(
                    checkpoints.c.name.startswith(prefix)
                )
            ).all()
        return {str(name): int(position) for name, position in rows}
