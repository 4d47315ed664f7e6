"""`continuum verify` (1): the hash chain over the stored log, on SQLite and PostgreSQL.

Every tampering test first seals a simulated cohort, then changes the database behind the
service's back the way a malicious DBA would: the append-only triggers are switched off
(PostgreSQL: `SET LOCAL session_replication_role = replica`, which skips ordinary triggers;
SQLite: the triggers are dropped), rows are changed with plain SQL, and verify must fail and
name the position and event id. The auditors' recipe in docs/verify.md is run as written.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text, update

from continuum.adapters.sql import tables as t
from continuum.adapters.sql.seals import SqlLogSeals
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.sealing import SealRefused, seal
from continuum.application.service import PatientService
from continuum.application.verify import ChainReport, verify_chain
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from continuum_events import wire
from continuum_events.chain import GENESIS, chain_hash
from tests.support import FixedClock

DOCS = Path(__file__).resolve().parents[2] / "docs" / "verify.md"
SQLITE_TRIGGERS = [
    f"{table}_no_{op}"
    for table in ("events", "event_log", "log_hashes")
    for op in ("update", "delete")
]


@pytest.fixture(params=["sqlite_engine", pytest.param("pg_engine", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Engine:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture
def sealed(engine: Engine, policies: PolicyRegistry) -> tuple[SqlEventStore, SqlLogSeals]:
    """A simulated cohort, sealed, that verifies clean."""
    store, seals = SqlEventStore(engine), SqlLogSeals(engine)
    clock = FixedClock(dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=12, days=60, seed=5)
    stats = seal(store, seals, batch=37)
    assert stats.sealed == store.head_position() > 60
    assert verify_chain(store, seals).findings == []
    return store, seals


@contextmanager
def behind_the_service(engine: Engine) -> Iterator[Connection]:
    """A transaction in which the append-only triggers do not fire."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            for trigger in SQLITE_TRIGGERS:
                conn.execute(text(f"DROP TRIGGER IF EXISTS {trigger}"))
        yield conn


def row_at(conn: Connection, position: int) -> Any:
    return conn.execute(
        text(
            "SELECT e.row_id, e.event_id, e.event_type, e.data, e.body FROM event_log l "
            "JOIN events e ON e.row_id = l.row_id WHERE l.position = :p"
        ),
        {"p": position},
    ).one()


def rewrite(
    engine: Engine,
    position: int,
    change: Callable[[dict[str, Any]], None],
    *,
    columns: bool,
    body: bool,
) -> str:
    """Change the event at `position` with `change(envelope)`, in its `data` column and/or its
    stored body; return its event id."""
    with behind_the_service(engine) as conn:
        row = row_at(conn, position)
        envelope = json.loads(row.body)
        change(envelope)
        values: dict[str, Any] = {}
        if columns:
            values["data"] = envelope["data"]
        if body:
            envelope["position"] = None
            values["body"] = wire.dumps(envelope).decode()
        conn.execute(update(t.events).where(t.events.c.row_id == row.row_id).values(**values))
        return str(row.event_id)


def admission_position(store: SqlEventStore, after: int = 10) -> int:
    return next(e.position for e in store.iter_all(after) if e.event_type == "PatientAdmitted")


def findings(report: ChainReport) -> list[tuple[str, int | None, str | None]]:
    return [(f.kind, f.position, f.event_id) for f in report.findings]


def forge_site(envelope: dict[str, Any]) -> None:
    envelope["data"]["placement"]["site"] = "site-forged"


# -- clean ---------------------------------------------------------------------------------


def test_sealing_is_idempotent_and_the_auditor_recipe_gives_the_same_head(
    sealed: tuple[SqlEventStore, SqlLogSeals], tmp_path: Path
) -> None:
    store, seals = sealed
    last = seals.last()
    assert last is not None
    assert seal(store, seals).sealed == 0
    export = tmp_path / "log.jsonl"
    export.write_bytes(b"".join(e.value + b"\n" for e in store.iter_wire(0, 50)))
    recipe = tmp_path / "recompute.py"
    [snippet] = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    recipe.write_text(snippet, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(recipe), str(export)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"{last.position}:{last.hash}"
    report = verify_chain(store, seals, expect_head=done.stdout.strip(), page=16)
    assert report.ok and report.findings == []
    assert (report.head_position, report.head_hash) == (last.position, last.hash)


def test_the_seal_table_is_append_only(sealed: tuple[SqlEventStore, SqlLogSeals]) -> None:
    store, _ = sealed
    for statement in ("UPDATE log_hashes SET hash = 'x'", "DELETE FROM log_hashes"):
        with pytest.raises(Exception, match="append-only"), store.engine.begin() as conn:
            conn.execute(text(statement))


def test_unsealed_tail_is_a_warning_and_sealing_resumes(
    sealed: tuple[SqlEventStore, SqlLogSeals], policies: PolicyRegistry
) -> None:
    store, seals = sealed
    head = store.head_position()
    clock = FixedClock(dt.datetime(2026, 8, 1, 12, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=2, days=20, seed=9)
    added = store.head_position() - head
    report = verify_chain(store, seals)
    assert report.ok
    assert findings(report) == [("unsealed", head + 1, report.findings[0].event_id)]
    assert report.unsealed == added and report.findings[0].severity == "warning"
    assert seal(store, seals).sealed == added
    assert verify_chain(store, seals).findings == []


# -- tampering -----------------------------------------------------------------------------


def test_a_data_field_changed_in_columns_and_body_is_named(
    sealed: tuple[SqlEventStore, SqlLogSeals],
) -> None:
    store, seals = sealed
    p = admission_position(store)
    event_id = rewrite(store.engine, p, forge_site, columns=True, body=True)
    assert store.read_all(p - 1, 1)[0].data.placement.site == "site-forged"  # type: ignore[union-attr]
    report = verify_chain(store, seals)
    assert not report.ok
    assert findings(report) == [("altered", p, event_id)]
    assert "changed after sealing" in report.findings[0].message


def test_only_the_column_changed_is_named_with_which_side_matches(
    sealed: tuple[SqlEventStore, SqlLogSeals],
) -> None:
    store, seals = sealed
    p = admission_position(store, after=30)
    event_id = rewrite(store.engine, p, forge_site, columns=True, body=False)
    report = verify_chain(store, seals)
    assert findings(report) == [("body_mismatch", p, event_id)]
    assert "the body matches the seal" in report.findings[0].message


def test_only_the_body_changed_is_named(sealed: tuple[SqlEventStore, SqlLogSeals]) -> None:
    store, seals = sealed
    p = admission_position(store, after=20)
    event_id = rewrite(store.engine, p, forge_site, columns=False, body=True)
    report = verify_chain(store, seals)
    assert findings(report) == [("body_mismatch", p, event_id)]
    assert "the columns match the seal" in report.findings[0].message


def test_a_clinical_time_changed_in_its_column_is_named(
    sealed: tuple[SqlEventStore, SqlLogSeals],
) -> None:
    store, seals = sealed
    with behind_the_service(store.engine) as conn:
        row = row_at(conn, 5)
        conn.execute(
            text("UPDATE events SET occurred_at = :t WHERE row_id = :r"),
            {"t": dt.datetime(2020, 1, 1, tzinfo=dt.UTC), "r": row.row_id},
        )
    report = verify_chain(store, seals)
    assert findings(report) == [("body_mismatch", 5, row.event_id)]


def test_a_deleted_event_is_named(sealed: tuple[SqlEventStore, SqlLogSeals]) -> None:
    store, seals = sealed
    with behind_the_service(store.engine) as conn:
        row = row_at(conn, 17)
        conn.execute(text("DELETE FROM event_log WHERE row_id = :r"), {"r": row.row_id})
        conn.execute(text("DELETE FROM events WHERE row_id = :r"), {"r": row.row_id})
    report = verify_chain(store, seals)
    assert findings(report) == [("removed", 17, row.event_id)]


def test_sealing_over_a_hole_is_refused(sealed: tuple[SqlEventStore, SqlLogSeals]) -> None:
    store, seals = sealed
    with behind_the_service(store.engine) as conn:
        conn.execute(text("DELETE FROM log_hashes WHERE position >= 17"))
        conn.execute(text("DELETE FROM event_log WHERE position = 17"))
    with pytest.raises(SealRefused, match="position 17 is missing"):
        seal(store, seals)
    last = seals.last()
    assert last is not None and last.position == 16


def test_the_last_event_deleted_is_named(sealed: tuple[SqlEventStore, SqlLogSeals]) -> None:
    store, seals = sealed
    head = store.head_position()
    with behind_the_service(store.engine) as conn:
        row = row_at(conn, head)
        conn.execute(text("DELETE FROM event_log WHERE row_id = :r"), {"r": row.row_id})
        conn.execute(text("DELETE FROM events WHERE row_id = :r"), {"r": row.row_id})
    report = verify_chain(store, seals)
    assert findings(report) == [("removed", head, row.event_id)]


def test_two_events_swapped_are_named(sealed: tuple[SqlEventStore, SqlLogSeals]) -> None:
    store, seals = sealed
    with behind_the_service(store.engine) as conn:
        first, second = row_at(conn, 8), row_at(conn, 21)
        conn.execute(text("UPDATE event_log SET position = -1 WHERE position = 8"))
        conn.execute(text("UPDATE event_log SET position = 8 WHERE position = 21"))
        conn.execute(text("UPDATE event_log SET position = 21 WHERE position = -1"))
    report = verify_chain(store, seals)
    assert findings(report) == [
        ("reordered", 8, second.event_id),
        ("reordered", 21, first.event_id),
    ]
    assert report.findings[0].detail["sealed_event_id"] == first.event_id


def test_a_changed_seal_is_named_as_the_seal(sealed: tuple[SqlEventStore, SqlLogSeals]) -> None:
    store, seals = sealed
    with behind_the_service(store.engine) as conn:
        conn.execute(text("UPDATE log_hashes SET hash = :h WHERE position = 12"), {"h": "e" * 64})
        event_id = row_at(conn, 12).event_id
    report = verify_chain(store, seals)
    assert findings(report) == [("seal", 12, event_id)]
    assert "sealed hash at position 12 was changed" in report.findings[0].message


def test_a_removed_seal_is_named(sealed: tuple[SqlEventStore, SqlLogSeals]) -> None:
    store, seals = sealed
    with behind_the_service(store.engine) as conn:
        conn.execute(text("DELETE FROM log_hashes WHERE position = 30"))
        event_id = row_at(conn, 30).event_id
    report = verify_chain(store, seals)
    assert findings(report) == [("seal", 30, event_id)]


def test_a_rewritten_history_with_recomputed_seals_fails_the_anchored_head(
    sealed: tuple[SqlEventStore, SqlLogSeals],
) -> None:
    """An attacker who also rewrites every later seal passes the chain, but not the head an
    auditor wrote down before."""
    store, seals = sealed
    anchored = seals.last()
    assert anchored is not None
    p = admission_position(store)
    rewrite(store.engine, p, forge_site, columns=True, body=True)
    with behind_the_service(store.engine) as conn:
        conn.execute(text("DELETE FROM log_hashes WHERE position >= :p"), {"p": p})
    seal(store, seals)
    assert verify_chain(store, seals).findings == []
    report = verify_chain(store, seals, expect_head=f"{anchored.position}:{anchored.hash}")
    assert findings(report) == [("head_mismatch", anchored.position, anchored.event_id)]
    plain = verify_chain(store, seals, expect_head=anchored.hash)
    assert [f.kind for f in plain.findings] == ["head_mismatch"]


def test_an_unreadable_event_is_named_and_the_rest_still_checked(
    sealed: tuple[SqlEventStore, SqlLogSeals],
) -> None:
    store, seals = sealed
    p = admission_position(store)

    def break_level(envelope: dict[str, Any]) -> None:
        envelope["data"]["placement"]["level"] = "no-such-level!"

    event_id = rewrite(store.engine, p, break_level, columns=True, body=False)
    q = admission_position(store, after=p + 5)
    other = rewrite(store.engine, q, forge_site, columns=True, body=True)
    report = verify_chain(store, seals, page=50)
    kinds = findings(report)
    assert ("unreadable", p, event_id) in kinds
    assert ("altered", q, other) in kinds
    assert {k for k, _, _ in kinds} == {"unreadable", "altered"}


# -- concurrency ---------------------------------------------------------------------------


def test_two_sealers_racing_write_one_chain(engine: Engine, policies: PolicyRegistry) -> None:
    store, seals = SqlEventStore(engine), SqlLogSeals(engine)
    clock = FixedClock(dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=15, days=60, seed=6)
    start = threading.Barrier(3)
    failures: list[BaseException] = []
    sealed_counts: list[int] = []

    def sealer() -> None:
        start.wait()
        try:
            sealed_counts.append(seal(store, seals, batch=7).sealed)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=sealer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert sum(sealed_counts) == store.head_position()
    expected = GENESIS
    for event in store.iter_wire():
        expected = chain_hash(expected, event.position, event.value)
    last = seals.last()
    assert last is not None and last.hash == expected
    assert verify_chain(store, seals).findings == []
