"""The access log in SQL: insert-only rows of `access_log` (revision 0005_access_log).

The database refuses UPDATE, DELETE and TRUNCATE on the table (triggers), so even a bug in
this process cannot rewrite who read what."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, insert, select

from continuum.adapters.sql.tables import access_log
from continuum.application.ports import AccessEntry, AccessLog

_FIELDS = [c.name for c in access_log.columns if c.name != "id"]


class SqlAccessLog(AccessLog):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, entry: AccessEntry) -> None:
        values = {name: getattr(entry, name) for name in _FIELDS}
        with self.engine.begin() as conn:
            conn.execute(insert(access_log).values(**values))

    def query(
        self,
        *,
        patient_key: str | None = None,
        subject: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[AccessEntry]:
        t = access_log
        stmt = select(t).where(t.c.id > after_id)
        if patient_key is not None:
            stmt = stmt.where(t.c.patient_key == patient_key)
        if subject is not None:
            stmt = stmt.where(t.c.subject == subject)
        if since is not None:
            stmt = stmt.where(t.c.at >= since)
        if until is not None:
            stmt = stmt.where(t.c.at < until)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt.order_by(t.c.id).limit(limit)).mappings().all()
        return [_entry(dict(row)) for row in rows]


def _entry(row: dict[str, Any]) -> AccessEntry:
    at = row["at"]
    if at.tzinfo is None:  # SQLite keeps no offset: every value was written in UTC
        row["at"] = at.replace(tzinfo=dt.UTC)
    return AccessEntry(**row)
