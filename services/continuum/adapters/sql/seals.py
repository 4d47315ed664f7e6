"""The sealed hash chain in the event store's own database (table log_hashes, revision
0004_hash_chain). Insert-only: triggers refuse UPDATE and DELETE; the primary key on position
makes two racing sealers collide instead of both writing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from continuum.adapters.sql import tables as t
from continuum.adapters.sql.database import BEGIN_MODE, is_sqlite
from continuum.application.ports import LogSeals, Seal, SealConflict

_COLUMNS = (t.log_hashes.c.position, t.log_hashes.c.event_id, t.log_hashes.c.hash)


class SqlLogSeals(LogSeals):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read_options = {BEGIN_MODE: "DEFERRED"} if is_sqlite(engine) else {}

    def last(self) -> Seal | None:
        query = select(*_COLUMNS).order_by(t.log_hashes.c.position.desc()).limit(1)
        with self.engine.connect().execution_options(**self._read_options) as conn:
            row = conn.execute(query).first()
        return None if row is None else Seal(int(row.position), row.event_id, row.hash)

    def read(self, after: int = 0, limit: int = 1000) -> list[Seal]:
        query = (
            select(*_COLUMNS)
            .where(t.log_hashes.c.position > after)
            .order_by(t.log_hashes.c.position)
            .limit(limit)
        )
        with self.engine.connect().execution_options(**self._read_options) as conn:
            return [Seal(int(r.position), r.event_id, r.hash) for r in conn.execute(query)]

    def add(self, seals: Sequence[Seal]) -> None:
        if not seals:
            return
        now = dt.datetime.now(dt.UTC)
        rows = [
            {"position": s.position, "event_id": s.event_id, "hash": s.hash, "sealed_at": now}
            for s in seals
        ]
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(t.log_hashes), rows)
        except IntegrityError as exc:
            raise SealConflict(
                f"positions {seals[0].position}..{seals[-1].position}: another sealer got "
                "there first"
            ) from exc
