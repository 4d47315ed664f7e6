"""The disclosure record in SQL: insert-only rows of `disclosures` (revision 0006_disclosures)
written in one transaction with the publisher's row in `checkpoints`.

The database refuses UPDATE, DELETE and TRUNCATE on the table (triggers), so even a bug in this
process cannot rewrite what was disclosed to whom."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from continuum.adapters.sql import tables as t
from continuum.adapters.sql.database import BEGIN_MODE, is_sqlite
from continuum.application.disclosure import Disclosure, DisclosureConflict, DisclosureRecord

_FIELDS = [c.name for c in t.disclosures.columns if c.name != "id"]


class SqlDisclosureRecord(DisclosureRecord):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read_options = {BEGIN_MODE: "DEFERRED"} if is_sqlite(engine) else {}

    def record(
        self, disclosures: Sequence[Disclosure], *, checkpoint: str, expected: int, position: int
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        cp = t.checkpoints
        try:
            with self.engine.begin() as conn:
                if disclosures:
                    conn.execute(
                        insert(t.disclosures),
                        [_row(d) for d in disclosures],
                    )
                moved = conn.execute(
                    update(cp)
                    .where(cp.c.name == checkpoint, cp.c.position == expected)
                    .values(position=position, updated_at=now)
                ).rowcount
                if not moved:
                    current = conn.scalar(select(cp.c.position).where(cp.c.name == checkpoint))
                    if current is not None or expected != 0:
                        raise _conflict(checkpoint, expected, current)
                    conn.execute(
                        insert(cp).values(name=checkpoint, position=position, updated_at=now)
                    )
        except IntegrityError as exc:
            raise DisclosureConflict(
                f"checkpoint {checkpoint} or one of these messages was recorded concurrently: "
                "another disclosure publisher runs for this organization (run one per "
                "organization); nothing was recorded by this one",
                checkpoint=checkpoint,
                expected=expected,
            ) from exc

    def checkpoint(self, name: str) -> int:
        query = select(t.checkpoints.c.position).where(t.checkpoints.c.name == name)
        with self.engine.connect().execution_options(**self._read_options) as conn:
            return int(conn.scalar(query) or 0)

    def last_offsets(self, org: str, topic: str) -> dict[int, int]:
        d = t.disclosures
        query = (
            select(d.c.partition, func.max(d.c.offset))
            .where(d.c.org == org, d.c.topic == topic)
            .group_by(d.c.partition)
        )
        with self.engine.connect().execution_options(**self._read_options) as conn:
            return {int(partition): int(offset) for partition, offset in conn.execute(query)}

    def query(
        self,
        *,
        org: str | None = None,
        patient_key: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[Disclosure]:
        d = t.disclosures
        stmt = select(d).where(d.c.id > after_id)
        if org is not None:
            stmt = stmt.where(d.c.org == org)
        if patient_key is not None:
            stmt = stmt.where(d.c.patient_key == patient_key)
        with self.engine.connect().execution_options(**self._read_options) as conn:
            rows = conn.execute(stmt.order_by(d.c.id).limit(limit)).mappings().all()
        return [_disclosure(dict(row)) for row in rows]


def _row(disclosure: Disclosure) -> dict[str, Any]:
    row = {name: getattr(disclosure, name) for name in _FIELDS}
    row["disclosed_at"] = disclosure.disclosed_at.astimezone(dt.UTC)
    return row


def _conflict(name: str, expected: int, current: int | None) -> DisclosureConflict:
    return DisclosureConflict(
        f"checkpoint {name} is at {current if current is not None else 'none'}, expected "
        f"{expected}: another disclosure publisher runs for this organization (run one per "
        "organization); nothing was recorded by this one",
        checkpoint=name,
        expected=expected,
        actual=current,
    )


def _disclosure(row: dict[str, Any]) -> Disclosure:
    at = row["disclosed_at"]
    if at.tzinfo is None:  # SQLite keeps no offset: every value was written in UTC
        row["disclosed_at"] = at.replace(tzinfo=dt.UTC)
    return Disclosure(**row)
