"""Compare two read models row by row: a live one and one rebuilt from the log.

Used by `continuum verify` (a rebuilt projection against the live one) and by the tests that
show the store runner and the Kafka runner, or a crashed-and-restarted runner and a clean
rebuild, reach the same state. What is compared is what the read models answer: patients,
stays, episodes, the audit trail and the census deltas (as a multiset: their row ids and the
snapshot boundaries depend on batch sizes, not on the log).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Table, select

from continuum_projections import readmodel as rm
from continuum_projections.readmodel import utc

COMPARED: list[tuple[Table, str]] = [
    (rm.patients, "patient_key"),
    (rm.stays, "stay_id"),
    (rm.episodes, "episode_id"),
    (rm.transitions, "event_id"),
]
#: Columns that legitimately differ between two correct builds.
IGNORED = {"fold_state"}


@dataclass(frozen=True)
class Difference:
    table: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.table} {self.key}: {self.message}"


def _norm(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return utc(value)
    if isinstance(value, float):
        return round(value, 6)
    return value


def _rows(engine: Engine, table: Table, key: str) -> dict[str, dict[str, Any]]:
    columns = [c for c in table.c if c.name not in IGNORED]
    with engine.connect() as conn:
        return {
            str(row[key]): {k: _norm(v) for k, v in row.items()}
            for row in conn.execute(select(*columns)).mappings()
        }


def _deltas(engine: Engine) -> Counter[tuple[Any, ...]]:
    d = rm.census_deltas
    columns = [d.c.event_id, d.c.recorded_at, *[d.c[k] for k in rm.CENSUS_KEY], d.c.delta]
    with engine.connect() as conn:
        return Counter(tuple(_norm(v) for v in row) for row in conn.execute(select(*columns)))


def diff_read_models(expected: Engine, actual: Engine, *, limit: int = 50) -> list[Difference]:
    """Every difference between two read models (at most `limit` per table)."""
    found: list[Difference] = []
    for table, key in COMPARED:
        a, b = _rows(expected, table, key), _rows(actual, table, key)
        shown = 0
        for k in sorted(a.keys() | b.keys()):
            if shown >= limit:
                found.append(Difference(table.name, "...", "more differences not listed"))
                break
            if k not in b:
                found.append(Difference(table.name, k, "missing"))
            elif k not in a:
                found.append(Difference(table.name, k, "unexpected row"))
            elif a[k] != b[k]:
                columns = [c for c in a[k] if a[k][c] != b[k].get(c)]
                detail = ", ".join(f"{c}: {a[k][c]!r} != {b[k].get(c)!r}" for c in columns[:5])
                found.append(Difference(table.name, k, detail))
            else:
                continue
            shown += 1
    da, db = _deltas(expected), _deltas(actual)
    if da != db:
        missing, extra = da - db, db - da
        found.append(
            Difference(
                rm.census_deltas.name,
                "*",
                f"{sum(missing.values())} census deltas missing, {sum(extra.values())} unexpected",
            )
        )
    return found
