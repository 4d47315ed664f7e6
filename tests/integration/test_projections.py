"""Projections on a hand-built cohort whose answers are worked out by hand below, on SQLite and
PostgreSQL; the fold against the domain's own fold on simulated cohorts; census as of a moment
against a replay to that moment; and the read model's error paths.

The cohort (day n = 2026-01-05 09:00 UTC + n days, clinical time; each command is recorded one
hour after its clinical time):

    A adult       admit 3.5 d0; reassess d10 (indicates 2.1, 12 h); step down to 2.1 d12;
                  attends 3 h on d14, d17, d21, d24 (12 h in the 14 days before the next move,
                  6 h/week < the 9 h minimum of 2.1); reassess d26 (indicates 1, 4 h);
                  step down to 1 d27; discharged d40 completed, home
    B adult       admit 2.1 d5 (12 h); discharged d9 dropped out, left against advice;
                  readmitted d20 at 3.5 (11 days after discharge, higher intensity);
                  reassess d28 (indicates 1); step down 3.5 -> 1 d30 (skips 3.3, 3.1, 2.5, 2.1)
    C adolescent  admit 3.5 d3; reassess d7 (indicates 3.5); moved to 2.1 d8 for want of a
                  slot (differs from indicated); that move voided d9 (entered in error)
    D adult       admit 1 d50 (4 h)
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text

from continuum.adapters.sql.store import SqlEventStore
from continuum.application.service import PatientService
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from continuum_events import AgeGroup, DischargeReason, Disposition, VarianceReason, VoidReason
from continuum_projections import readmodel as rm
from continuum_projections import reports
from continuum_projections.census import CensusProjection
from continuum_projections.compare import diff_read_models
from continuum_projections.fold import OutOfOrder
from continuum_projections.readmodel import ReadModel, ReadModelError
from continuum_projections.runners import StoreRunner
from tests.support import T0, FixedClock, assessment, index_names

HOUR = dt.timedelta(hours=1)


def day(n: float) -> dt.datetime:
    return T0 + dt.timedelta(days=n)


@dataclass
class Cohort:
    store: SqlEventStore
    keys: dict[str, str]
    events: dict[str, str]  # name -> event id


class Builder:
    def __init__(self, store: SqlEventStore, policies: PolicyRegistry) -> None:
        self.clock = FixedClock(day(0))
        self.service = PatientService(store, policies, self.clock)

    def at(self, n: float) -> dt.datetime:
        self.clock.now = day(n) + HOUR
        return day(n)

    def run(self, command: c.Command) -> Any:
        return self.service.handle(command).events[0]


def build_cohort(store: SqlEventStore, policies: PolicyRegistry) -> Cohort:
    b = Builder(store, policies)
    keys: dict[str, str] = {}
    ids: dict[str, str] = {}

    def admit(
        name: str, n: float, level: str, ratings: str, hours: float | None, **kw: Any
    ) -> None:
        event = b.run(
            c.Admit(
                occurred_at=b.at(n),
                level=level,
                site=kw.pop("site", "site-a"),
                age_group=kw.pop("age_group", AgeGroup.ADULT),
                assessment=assessment(ratings, hours),
                **kw,
            )
        )
        keys[name] = event.stream_id

    def reassess(name: str, n: float, ratings: str, hours: float | None = None) -> None:
        b.run(
            c.RecordReassessment(
                patient_key=keys[name], occurred_at=b.at(n), assessment=assessment(ratings, hours)
            )
        )

    def move(name: str, n: float, level: str, **kw: Any) -> str:
        event = b.run(
            c.Transition(patient_key=keys[name], occurred_at=b.at(n), to_level=level, **kw)
        )
        return str(event.event_id)

    def attend(name: str, n: float, hours: float) -> None:
        b.run(
            c.RecordAttendance(
                patient_key=keys[name], occurred_at=b.at(n), service_date=day(n).date(), hours=hours
            )
        )

    def discharge(name: str, n: float, reason: DischargeReason, disposition: Disposition) -> None:
        b.run(
            c.Discharge(
                patient_key=keys[name], occurred_at=b.at(n), reason=reason, disposition=disposition
            )
        )

    # In recorded-time order (the clock only moves forward).
    admit("A", 0, "3.5", "001040", None)
    admit("C", 3, "3.5", "001040", None, age_group=AgeGroup.ADOLESCENT)
    admit("B", 5, "2.1", "000020", 12)
    reassess("C", 7, "001040", 8)
    ids["C_move"] = move("C", 8, "2.1", variance_reason=VarianceReason.NO_SLOT)
    b.run(
        c.VoidEvent(
            patient_key=keys["C"],
            event_id=ids["C_move"],
            reason=VoidReason.ENTERED_IN_ERROR,
            occurred_at=b.at(9),
        )
    )
    discharge("B", 9.5, DischargeReason.DROPPED_OUT, Disposition.LEFT_AGAINST_ADVICE)
    reassess("A", 10, "000020", 12)
    ids["A_down1"] = move("A", 12, "2.1")
    for n in (14, 17, 21, 24):
        attend("A", n, 3)
    b.run(
        c.Readmit(
            patient_key=keys["B"],
            occurred_at=b.at(20),
            level="3.5",
            site="site-b",
            assessment=assessment("001040"),
        )
    )
    reassess("A", 26, "000010", 4)
    ids["A_down2"] = move("A", 27, "1")
    reassess("B", 28, "000010", 4)
    ids["B_down"] = move("B", 30, "1")
    discharge("A", 40, DischargeReason.COMPLETED, Disposition.HOME)
    admit("D", 50, "1", "000010", 4)
    return Cohort(store=store, keys=keys, events=ids)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Engine:
    fixture = {"sqlite": "sqlite_engine", "postgres": "pg_engine"}[request.param]
    result: Engine = request.getfixturevalue(fixture)
    return result


@pytest.fixture
def projected(engine: Engine, policies: PolicyRegistry) -> tuple[Cohort, ReadModel]:
    store = SqlEventStore(engine)
    cohort = build_cohort(store, policies)
    model = ReadModel(engine)
    model.create()
    StoreRunner(store, model, policies, flush_every=7).run()
    return cohort, model


def levels(census: reports.Census) -> dict[str, int]:
    return {k: v for k, v in census.levels().items() if v}


def test_current_census_by_level_site_and_age_group(projected: tuple[Cohort, ReadModel]) -> None:
    _, model = projected
    with model.engine.connect() as conn:
        census = reports.current_census(conn)
    assert levels(census) == {"1": 2, "3.5": 1}
    assert census.total == 3
    assert census.by(1) == {"site-a": {"1": 1, "3.5": 1}, "site-b": {"1": 1}}
    assert census.by(3) == {"adolescent": {"3.5": 1}, "adult": {"1": 2}}


def test_census_as_of_recorded_time_and_in_care_at_clinical_time(
    projected: tuple[Cohort, ReadModel],
) -> None:
    _, model = projected
    with model.engine.connect() as conn:
        # After C's move was recorded and before its void: the log then said C was in 2.1.
        said = reports.census_as_of(conn, day(8.5))
        # At that clinical instant, as the log knows it now: the move was voided.
        known = reports.census_in_care_at(conn, day(8.5))
        later = reports.census_as_of(conn, day(10.5))
        before_anything = reports.census_as_of(conn, day(0))
        now = reports.census_as_of(conn, day(400))
    assert levels(said) == {"3.5": 1, "2.1": 2}
    assert levels(known) == {"3.5": 2, "2.1": 1}
    assert levels(later) == {"3.5": 2}
    assert before_anything.total == 0  # A was recorded an hour after d0
    assert levels(now) == {"1": 2, "3.5": 1}


def test_daily_census_counts_stays_open_at_midnight(projected: tuple[Cohort, ReadModel]) -> None:
    _, model = projected
    with model.engine.connect() as conn:
        history = reports.daily_census(conn, day(8).date(), day(13).date())
    # Midnights of d8..d13 (the day starts at 00:00, stays change at 09:00).
    assert [history.counts[d] for d in history.days] == [
        {"2.1": 1, "3.5": 2},  # d8 00:00: A 3.5, C 3.5, B 2.1
        {"2.1": 1, "3.5": 2},  # d9: C's move voided, so C was in 3.5 throughout
        {"3.5": 2},  # d10: B discharged d9.5
        {"3.5": 2},
        {"3.5": 2},  # d12 00:00: A still in 3.5 (moves at 09:00)
        {"2.1": 1, "3.5": 1},
    ]
    assert history.average() == {"2.1": 0.5, "3.5": 1.83}


def test_audit_trail_rows_and_flags(projected: tuple[Cohort, ReadModel]) -> None:
    cohort, model = projected
    with model.engine.connect() as conn:
        rows = {r["event_id"]: r for r in reports.audit_trail(conn)}
        flagged = reports.audit_trail(conn, flagged_only=True)
        january = reports.audit_trail(conn, day(0), day(15))
    assert len(rows) == 5  # four transitions (one voided) and one readmission
    c_move = rows[cohort.events["C_move"]]
    assert c_move["voided"] is True
    assert c_move["flag_level_differs"] is True
    assert (c_move["indicated_level"], c_move["to_level"]) == ("3.5", "2.1")
    assert c_move["variance_reason"] == "no_slot"
    assert c_move["reassessment_age_days"] == pytest.approx(1.0)

    a1 = rows[cohort.events["A_down1"]]
    assert (a1["direction"], a1["from_level"], a1["to_level"]) == ("step_down", "3.5", "2.1")
    assert a1["reassessment_at"] == day(10)
    assert a1["reassessment_age_days"] == pytest.approx(2.0)
    assert a1["ratings"] == '{"1":"0","2":"0","3":"0","4":"0","5":"2","6":"0"}'
    assert a1["skipped_levels"] == "3.3,3.1,2.5"
    assert a1["flag_hours_below_band"] is False  # 3.5 has no hours band
    assert (a1["actor_role"], a1["policy_id"], a1["policy_version"]) == (
        "system",
        "asam-3",
        "2026.1",
    )

    a2 = rows[cohort.events["A_down2"]]
    assert (a2["from_level"], a2["to_level"], a2["skipped_levels"]) == ("2.1", "1", None)
    assert a2["hours_attended_14d"] == 12
    assert a2["hours_per_week_attended"] == 6.0
    assert (a2["hours_band_min"], a2["flag_hours_below_band"]) == (9.0, True)
    assert a2["flag_stale_reassessment"] is False
    assert a2["window_days"] == 7

    b_down = rows[cohort.events["B_down"]]
    assert b_down["skipped_levels"] == "3.3,3.1,2.5,2.1"
    assert b_down["flag_skipped_levels"] is True

    readmission = next(r for r in rows.values() if r["kind"] == "readmission")
    assert readmission["patient_key"] == cohort.keys["B"]
    assert (readmission["from_level"], readmission["to_level"]) == ("2.1", "3.5")
    assert readmission["days_since_discharge"] == pytest.approx(10.5)
    assert readmission["flag_readmission_30d"] is True

    assert {r["event_id"] for r in flagged} == set(rows)  # every row here has a flag
    assert {r["event_id"] for r in january} == {cohort.events["C_move"], cohort.events["A_down1"]}


def test_outcome_metrics(projected: tuple[Cohort, ReadModel]) -> None:
    _, model = projected
    with model.engine.connect() as conn:
        m = reports.outcome_metrics(conn, day(0), day(45))
        early = reports.outcome_metrics(conn, day(0), day(15))
    data = m.to_json_dict()
    los = data["length_of_stay_days"]
    # Stays ended in the range (C's voided stay and C's reopened 3.5 stay do not count):
    # 3.5: A 12 d, B 10 d; 2.1: A 15 d, B 4.5 d -> 4 (date difference); 1: A 13 d.
    assert los["by_level"]["3.5"] == {"n": 2, "median": 11.0, "mean": 11.0}
    assert los["by_level"]["2.1"] == {"n": 2, "median": 9.5, "mean": 9.5}
    assert los["by_level"]["1"] == {"n": 1, "median": 13.0, "mean": 13.0}
    # Episodes discharged: A 40 d, B 4 d.
    assert los["episode"] == {"n": 2, "median": 22.0, "mean": 22.0}
    assert data["exits_by_level"]["3.5"]["step_down_rate"] == 1.0
    assert data["exits_by_level"]["2.1"]["step_down_rate"] == 0.5
    assert data["exits_by_level"]["2.1"]["discharge"] == 1
    assert data["completion_rate"] == 0.5
    assert data["ama_rate"] == 0.5
    assert data["readmission_30d"]["eligible_discharges"] == 2
    assert data["readmission_30d"]["rate"] == 0.5
    # A was discharged d40; the log ends d50: less than 30 days of follow-up.
    assert data["readmission_30d"]["follow_up_incomplete"] == 1
    assert early.discharges == 1
    assert early.to_json_dict()["ama_rate"] == 1.0


def test_rebuild_equals_incremental_and_catch_up_is_idempotent(
    projected: tuple[Cohort, ReadModel], policies: PolicyRegistry, tmp_path: Any
) -> None:
    cohort, model = projected
    assert StoreRunner(cohort.store, model, policies).run().events == 0
    from continuum.adapters.sql.database import create_database_engine

    other = create_database_engine(f"sqlite:///{tmp_path / 'rebuild.sqlite3'}")
    rebuilt = ReadModel(other)
    rebuilt.create()
    StoreRunner(cohort.store, rebuilt, policies, flush_every=100_000).run()
    assert diff_read_models(model.engine, other) == []
    with other.begin() as conn:
        conn.execute(text("UPDATE rm_stays SET level = '2.5' WHERE level = '1'"))
    differences = diff_read_models(model.engine, other)
    assert differences
    assert all(d.table == "rm_stays" and "level" in d.message for d in differences)


# -- the fold against the domain's fold, and as-of against replay -----------------------------


@pytest.mark.parametrize("seed", [3, 11])
def test_fold_census_equals_domain_fold_on_simulated_cohorts(
    sqlite_engine: Engine, policies: PolicyRegistry, seed: int
) -> None:
    store = SqlEventStore(sqlite_engine)
    clock = FixedClock(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=60, days=120, seed=seed)
    model = ReadModel(sqlite_engine)
    model.create()
    StoreRunner(store, model, policies, flush_every=500).run()
    domain = CensusProjection(policies).apply_all(store.iter_all())
    expected: dict[tuple[str, str], int] = {}
    for state in domain.active():
        key = (state.state, state.site or "")
        expected[key] = expected.get(key, 0) + 1
    with sqlite_engine.connect() as conn:
        census = reports.current_census(conn)
    got: dict[tuple[str, str], int] = {}
    for (level, site, _program, _age), n in census.counts.items():
        got[(level, site)] = got.get((level, site), 0) + n
    assert got == expected
    assert census.total == len(domain.active()) > 0


def _snapshots(engine: Engine) -> list[Any]:
    """Every census snapshot: (boundary, deltas, level, site, program, age group, count)."""
    with engine.connect() as conn:
        return [
            (rm.utc(rm._time(row[0])), *row[1:])
            for row in conn.execute(
                text(
                    "SELECT b.boundary, b.deltas, s.level, s.site, s.program, s.age_group,"
                    " s.count FROM rm_census_boundaries b JOIN rm_census_snapshots s"
                    " ON s.boundary = b.boundary ORDER BY 1, 3, 4, 5, 6"
                )
            )
        ]


@pytest.mark.parametrize("flush_every", [97, 1_000])
def test_census_as_of_equals_a_replay_to_that_moment(
    engine: Engine,
    policies: PolicyRegistry,
    tmp_path: Any,
    monkeypatch: Any,
    flush_every: int,
) -> None:
    """Snapshots every 40 deltas (several per flush with the larger batches); events
    recorded over 120 days; random moments."""
    monkeypatch.setattr(rm, "SNAPSHOT_EVERY", 40)
    store = SqlEventStore(engine)

    class Ticking(FixedClock):
        def __call__(self) -> dt.datetime:
            self.now += dt.timedelta(minutes=37)
            return self.now

    clock = Ticking(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=40, days=120, seed=5)
    model = ReadModel(engine)
    model.create()
    # Snapshots kept batch by batch: a first run (of one event) cuts the snapshots that a
    # rebuild from the start defers at its end, and from then on they are kept as it goes.
    runner = StoreRunner(store, model, policies, flush_every=flush_every)
    runner.run(max_events=1)
    assert not model.snapshots_deferred()
    runner.run()
    with engine.connect() as conn:
        snapshots = conn.execute(text("SELECT count(*) FROM rm_census_boundaries")).scalar()
        first = conn.execute(text("SELECT min(recorded_at) FROM events")).scalar()
        last = conn.execute(text("SELECT max(recorded_at) FROM events")).scalar()
    assert snapshots and snapshots > 3
    with engine.connect() as conn:
        # The current census (latest snapshot plus later deltas) counts the active patients.
        active = conn.execute(
            text(
                "SELECT level, site, coalesce(program, ''), age_group, count(*) FROM rm_patients"
                " WHERE active GROUP BY 1, 2, 3, 4"
            )
        ).all()
        assert reports.current_census(conn).counts == {
            (r[0], r[1], r[2], r[3]): r[4] for r in active
        }
        assert reports.current_census(conn).position == store.head_position()
    start, end = (
        rm.utc(dt.datetime.fromisoformat(str(first))),
        rm.utc(dt.datetime.fromisoformat(str(last))),
    )
    assert start is not None and end is not None
    rng = random.Random(7)
    from continuum.adapters.sql.database import create_database_engine

    for i in range(6):
        moment = start + (end - start) * rng.random()
        target = create_database_engine(f"sqlite:///{tmp_path / f'asof-{i}.sqlite3'}")
        replayed = ReadModel(target)
        replayed.create()
        StoreRunner(store, replayed, policies, as_of=moment).run()
        with target.connect() as conn:
            expected = reports.current_census(conn).counts
        with engine.connect() as conn:
            got = reports.census_as_of(conn, moment).counts
        assert got == expected, moment
        target.dispose()

    # Cut all at once from the deltas (as a parallel rebuild's merge does), the snapshots
    # are the ones cut batch by batch.
    incremental = _snapshots(engine)
    with engine.begin() as conn:
        rm._cut_all_snapshots(conn)  # PostgreSQL: the sums in SQL (`_cut_in_sql`)
    assert _snapshots(engine) == incremental
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            in_sql, in_python = rm._cut_in_sql(conn), rm._cut_in_python(conn)
        assert in_sql[1] == in_python[1]
        assert sorted(in_sql[0], key=repr) == sorted(in_python[0], key=repr)


def test_a_rebuild_from_the_start_cuts_the_census_snapshots_at_the_end_of_its_run(
    engine: Engine, policies: PolicyRegistry, tmp_path: Any, monkeypatch: Any
) -> None:
    """Deferred, they are the snapshots kept batch by batch, also when the rebuild fails
    half-way and the next run goes on; meanwhile the index only their upkeep reads is not
    there."""
    from continuum.adapters.sql.database import create_database_engine

    monkeypatch.setattr(rm, "SNAPSHOT_EVERY", 5)
    store = SqlEventStore(engine)
    build_cohort(store, policies)
    kept = create_database_engine(f"sqlite:///{tmp_path / 'kept.sqlite3'}")
    kept_model = ReadModel(kept)
    kept_model.create()
    kept_runner = StoreRunner(store, kept_model, policies, flush_every=7)
    kept_runner.run(max_events=1)
    kept_runner.run()
    assert len(_snapshots(kept)) > 5

    model = ReadModel(engine)
    model.create()
    _fail_census_deltas(monkeypatch, batch=3)
    with pytest.raises(RuntimeError, match="disk full"):
        StoreRunner(store, model, policies, flush_every=7).run()
    assert model.snapshots_deferred()
    assert not rm.UPKEEP_INDEXES & index_names(engine)
    assert _snapshots(engine) == []

    seen: list[bool] = []
    StoreRunner(store, model, policies, flush_every=7).run(
        on_progress=lambda _: seen.append(model.snapshots_deferred())
    )
    assert seen[0] and not seen[-1]  # still deferred as it went on; cut at the end
    assert index_names(engine) >= rm.UPKEEP_INDEXES
    assert _snapshots(engine) == _snapshots(kept)
    kept.dispose()


def test_late_recorded_deltas_are_added_to_earlier_snapshots(
    sqlite_engine: Engine, policies: PolicyRegistry, monkeypatch: Any
) -> None:
    """A delta recorded at or before a snapshot boundary but applied after it (interleaved
    clocks, Kafka partitions) must change that snapshot."""
    monkeypatch.setattr(rm, "SNAPSHOT_EVERY", 1)
    store = SqlEventStore(sqlite_engine)
    cohort = build_cohort(store, policies)
    model = ReadModel(sqlite_engine)
    model.create()
    runner = StoreRunner(store, model, policies, flush_every=1)
    events = list(store.iter_all())
    # Apply D's admission (recorded last) first, then everything else, by hand.
    from continuum_events import canonical_json
    from continuum_projections.fold import decode

    d_events = [e for e in events if e.stream_id == cohort.keys["D"]]
    rest = [e for e in events if e.stream_id != cohort.keys["D"]]
    for event in d_events + rest:
        runner.fold.apply(decode(canonical_json(event)))
        changes, touched = runner.fold.take()
        model.flush(changes, touched, {})
    with sqlite_engine.connect() as conn:
        for n in (0.5, 8.5, 10.5, 35, 60):
            expected = {
                k: v for k, v in reports.census_in_care_at(conn, day(n)).counts.items() if v
            }
            got = reports.census_as_of(conn, day(n) + HOUR).counts
            if n != 8.5:  # at 8.5 the recorded-time census differs by design (C's voided move)
                assert got == expected, n


# -- error paths -------------------------------------------------------------------------------


def test_events_out_of_order_are_refused_and_duplicates_skipped(
    sqlite_engine: Engine, policies: PolicyRegistry
) -> None:
    from continuum_events import canonical_json
    from continuum_projections.fold import ContinuumFold, decode
    from continuum_projections.policyview import PolicyViews

    store = SqlEventStore(sqlite_engine)
    cohort = build_cohort(store, policies)
    a = [decode(canonical_json(e)) for e in store.read_stream(cohort.keys["A"])]
    fold = ContinuumFold(PolicyViews(policies))
    assert fold.apply(a[0]) is True
    assert fold.apply(a[0]) is False
    assert fold.duplicates == 1
    with pytest.raises(OutOfOrder, match=r"version 3 of pk-.* has applied up to version 1"):
        fold.apply(a[2])


def test_read_model_refuses_another_schema_version_and_a_second_source(
    sqlite_engine: Engine, policies: PolicyRegistry
) -> None:
    model = ReadModel(sqlite_engine)
    model.create()
    StoreRunner(SqlEventStore(sqlite_engine), model, policies).run()
    with pytest.raises(ReadModelError, match="fed by store; it cannot also be fed by kafka:t"):
        model.claim("kafka:t")
    with sqlite_engine.begin() as conn:
        conn.execute(text("UPDATE rm_meta SET value = '0' WHERE key = 'schema'"))
    with pytest.raises(ReadModelError, match="schema version 0; this code writes version 1"):
        model.create()
    model.reset()
    model.create()  # a rebuilt read model is usable again


def _assert_equals_a_clean_rebuild(
    store: SqlEventStore, engine: Engine, policies: PolicyRegistry
) -> None:
    from continuum.adapters.sql.database import create_database_engine

    clean = create_database_engine("sqlite://")
    rebuilt = ReadModel(clean)
    rebuilt.create()
    StoreRunner(store, rebuilt, policies).run()
    assert diff_read_models(clean, engine) == []


def _fail_census_deltas(monkeypatch: Any, batch: int) -> list[int]:
    """Fail the `batch`-th batch that has census deltas, after its other rows, while writing
    them (inside its transaction). Returns the number of deltas of each batch tried."""
    original = rm._write
    seen: list[int] = []

    def failing(conn: Any, table: Any, rows: Any) -> None:
        if table is rm.census_deltas:
            seen.append(len(rows))
            if len(seen) == batch:
                raise RuntimeError("disk full (simulated)")
        original(conn, table, rows)

    monkeypatch.setattr(rm, "_write", failing)
    return seen


def test_a_failed_flush_writes_nothing_and_the_runner_resumes(
    sqlite_engine: Engine, policies: PolicyRegistry, monkeypatch: Any
) -> None:
    store = SqlEventStore(sqlite_engine)
    build_cohort(store, policies)
    model = ReadModel(sqlite_engine)
    model.create()
    _fail_census_deltas(monkeypatch, batch=3)
    runner = StoreRunner(store, model, policies, flush_every=5, page=5)
    with pytest.raises(RuntimeError, match="disk full"):
        runner.run()
    saved = model.checkpoint("store")
    assert 0 < saved < store.head_position()
    # The batches written saved the patients out of care only: the state of those in care
    # is complete only up to the start, so the next run folds up to `saved` again first.
    assert model.checkpoint("store:state") == 0
    resumed = StoreRunner(store, model, policies, flush_every=5, page=5).run()
    assert resumed.refolded == saved
    assert model.checkpoint("store:state") == model.checkpoint("store") == store.head_position()
    _assert_equals_a_clean_rebuild(store, sqlite_engine, policies)


def test_a_long_catch_up_saves_every_patient_every_few_batches(
    sqlite_engine: Engine, policies: PolicyRegistry, monkeypatch: Any
) -> None:
    """Every COMPLETE_EVERY batches the state checkpoint catches up with the checkpoint, so a
    runner that fails later folds again only from there."""
    from continuum_projections import runners

    monkeypatch.setattr(runners, "COMPLETE_EVERY", 2)
    store = SqlEventStore(sqlite_engine)
    build_cohort(store, policies)
    model = ReadModel(sqlite_engine)
    model.create()
    seen = _fail_census_deltas(monkeypatch, batch=4)
    # One batch per 5 positions: batches 1 and 3 save only patients out of care, batch 2 all.
    with pytest.raises(RuntimeError, match="disk full"):
        StoreRunner(store, model, policies, flush_every=5, page=5).run()
    assert len(seen) == 4 and all(seen)  # every batch had census deltas to write
    assert model.checkpoint("store:state") == 10
    assert model.checkpoint("store") == 15
    resumed = StoreRunner(store, model, policies, flush_every=5, page=5).run()
    assert resumed.refolded == 5
    _assert_equals_a_clean_rebuild(store, sqlite_engine, policies)


def test_a_run_that_folds_nothing_still_moves_its_state_checkpoint(
    sqlite_engine: Engine, policies: PolicyRegistry
) -> None:
    """A replay as of a moment before every event changes no patient; its state checkpoint
    must still reach its checkpoint, or every later run would fold the log again first."""
    store = SqlEventStore(sqlite_engine)
    build_cohort(store, policies)
    head = store.head_position()
    # Batches of 4 events end exactly at the head, and fewer than COMPLETE_EVERY of them: no
    # batch is a complete one on its own.
    assert head % 4 == 0 and head // 4 < 10
    model = ReadModel(sqlite_engine)
    model.create()
    runner = StoreRunner(store, model, policies, as_of=T0 - dt.timedelta(days=1), flush_every=4)
    assert runner.run().skipped == head
    assert model.checkpoint("store:state") == model.checkpoint("store") == head
    assert StoreRunner(store, model, policies, as_of=T0 - dt.timedelta(days=1)).run().refolded == 0


def test_query_indexes_are_built_once_the_first_run_has_caught_up(
    engine: Engine, policies: PolicyRegistry
) -> None:
    store = SqlEventStore(engine)
    build_cohort(store, policies)
    model = ReadModel(engine)
    model.create()
    assert not (rm.DEFERRED_INDEXES & index_names(engine))
    assert "ix_rm_census_deltas_recorded_at" in index_names(engine)  # the writer needs this one
    StoreRunner(store, model, policies, flush_every=10).run()
    assert index_names(engine) >= rm.DEFERRED_INDEXES
    model.finish()  # idempotent


def test_finishing_runs_a_merge_alongside_and_the_indexes_are_built_even_if_it_fails(
    engine: Engine, policies: PolicyRegistry
) -> None:
    """A parallel rebuild's merge runs while the query indexes are built (`alongside`); it
    runs whether or not there is anything to build, and its error reaches the caller."""
    store = SqlEventStore(engine)
    build_cohort(store, policies)
    model = ReadModel(engine)
    model.create()

    class MergeFailed(Exception):
        pass

    def failing_merge() -> None:
        raise MergeFailed

    with pytest.raises(MergeFailed):
        model.finish(alongside=failing_merge)
    # Harmless: the next run keeps them up to date.
    assert index_names(engine) >= rm.DEFERRED_INDEXES
    merged: list[str] = []
    model.finish(alongside=lambda: merged.append("merged"))  # nothing left to build
    assert merged == ["merged"]
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:  # every table was analyzed (and vacuumed)
            unanalyzed = conn.exec_driver_sql(
                "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema()"
                " AND relname LIKE 'rm_%%' AND last_analyze IS NULL"
            ).all()
        assert unanalyzed == []


def test_a_batch_is_cut_by_its_row_count_too(
    sqlite_engine: Engine, policies: PolicyRegistry, monkeypatch: Any, tmp_path: Any
) -> None:
    from continuum.adapters.sql.database import create_database_engine
    from continuum_projections import runners

    monkeypatch.setattr(runners, "MAX_BATCH_ROWS", 5)
    store = SqlEventStore(sqlite_engine)
    build_cohort(store, policies)
    model = ReadModel(sqlite_engine)
    model.create()
    progress = StoreRunner(store, model, policies, flush_every=1_000_000).run()
    assert progress.flushes > 3  # the events alone would make one batch
    clean = create_database_engine(f"sqlite:///{tmp_path / 'clean.sqlite3'}")
    rebuilt = ReadModel(clean)
    rebuilt.create()
    monkeypatch.setattr(runners, "MAX_BATCH_ROWS", 100_000)
    assert StoreRunner(store, rebuilt, policies, flush_every=1_000_000).run().flushes == 1
    assert diff_read_models(clean, sqlite_engine) == []


def _byte_by_byte_columns(conn: Connection) -> dict[tuple[str, str], int]:
    """(table, column) -> length of this schema's COLLATE "C" columns (PostgreSQL)."""
    rows = conn.exec_driver_sql(
        "SELECT table_name, column_name, character_maximum_length FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND collation_name = 'C'"
    )
    return {(row[0], row[1]): int(row[2]) for row in rows}


@pytest.mark.postgres
def test_identifier_columns_compare_byte_by_byte_on_postgresql(pg_engine: Engine) -> None:
    """Event, stay and episode ids and patient keys in the row tables: COLLATE "C"."""
    ReadModel(pg_engine).create()
    with pg_engine.connect() as conn:
        byte_by_byte = set(_byte_by_byte_columns(conn))
    ids = {
        "rm_patients": {"patient_key", "episode_id"},
        "rm_stays": {"stay_id", "patient_key", "episode_id", "end_event_id"},
        "rm_episodes": {
            "episode_id", "patient_key", "admission_event_id", "previous_episode_id",
            "discharge_event_id", "readmission_episode_id",
        },
        "rm_transitions": {
            "event_id", "patient_key", "episode_id", "reassessment_event_id", "voided_by"
        },
    }  # fmt: skip
    assert byte_by_byte == {(table, column) for table, names in ids.items() for column in names}


@pytest.mark.postgres
def test_a_read_model_made_before_its_identifiers_were_byte_by_byte_is_still_written(
    pg_engine: Engine, policies: PolicyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its key columns keep the database's default collation (no schema version change asks
    for a rebuild): the writer's temporary tables (every patch goes through one here) have
    "C" keys, and PostgreSQL compares a default-collation key with them in "C"."""
    monkeypatch.setattr(rm, "BULK_UPDATE_FROM", 1)
    model = ReadModel(pg_engine)
    model.create()
    with pg_engine.begin() as conn:
        identifiers = _byte_by_byte_columns(conn)
        assert identifiers
        for (table, column), length in identifiers.items():
            conn.exec_driver_sql(
                f"ALTER TABLE {table} ALTER COLUMN {column}"
                f' TYPE varchar({length}) COLLATE "default"'
            )
        assert _byte_by_byte_columns(conn) == {}
    store = SqlEventStore(pg_engine)
    build_cohort(store, policies)
    StoreRunner(store, model, policies, flush_every=3).run()
    _assert_equals_a_clean_rebuild(store, pg_engine, policies)


def test_a_read_model_whose_census_deltas_have_a_surrogate_key_is_still_written(
    engine: Engine, policies: PolicyRegistry
) -> None:
    """Read models made before the census deltas lost their unused `delta_id` key."""
    model = ReadModel(engine)
    model.create()
    postgres = engine.dialect.name == "postgresql"
    key, time = ("BIGSERIAL", "TIMESTAMP WITH TIME ZONE") if postgres else ("INTEGER", "DATETIME")
    with engine.begin() as conn:  # the table as it was made then
        conn.exec_driver_sql("DROP TABLE rm_census_deltas")
        conn.exec_driver_sql(
            f"CREATE TABLE rm_census_deltas (delta_id {key} PRIMARY KEY,"
            f" event_id VARCHAR(36) NOT NULL, position BIGINT, recorded_at {time} NOT NULL,"
            " level VARCHAR(24) NOT NULL, site VARCHAR(64) NOT NULL,"
            " program VARCHAR(64) NOT NULL, age_group VARCHAR(16) NOT NULL,"
            " delta INTEGER NOT NULL)"
        )
        conn.exec_driver_sql(
            "CREATE INDEX ix_rm_census_deltas_recorded_at ON rm_census_deltas (recorded_at)"
        )
    store = SqlEventStore(engine)
    build_cohort(store, policies)
    StoreRunner(store, model, policies, flush_every=3).run()
    _assert_equals_a_clean_rebuild(store, engine, policies)
    with engine.connect() as conn:
        ids = conn.exec_driver_sql("SELECT delta_id FROM rm_census_deltas").scalars().all()
    assert ids and len(set(ids)) == len(ids)


def test_the_fold_state_is_compressed_with_lz4_where_the_server_offers_it(
    pg_engine: Engine,
) -> None:
    ReadModel(pg_engine).create()
    with pg_engine.connect() as conn:
        offered = conn.execute(
            text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
        ).scalar()
        method = conn.execute(
            text(
                "SELECT attcompression FROM pg_attribute "
                "WHERE attrelid = 'rm_patients'::regclass AND attname = 'fold_state'"
            )
        ).scalar()
    assert method == ("l" if "lz4" in (offered or []) else "")


def test_the_fold_state_keeps_the_servers_default_compression_without_lz4() -> None:
    assert rm.toast_compression(["pglz", "lz4"]) == "lz4"
    assert rm.toast_compression(["pglz"]) is None  # a server built without LZ4
    assert rm.toast_compression(None) is None  # PostgreSQL 13 or older: no such setting


def test_a_copied_value_of_another_type_than_its_column_is_written_all_the_same(
    pg_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """COPY formats each column by its SQL type; a value that does not fit (the fold makes
    none) sends the COPY back to a savepoint and again with a formatter per value: every row
    of the batch is written once, with what was written before it in the transaction."""
    ReadModel(pg_engine).create()
    d = rm.census_deltas
    row = {
        "event_id": "e-1",
        "position": 1,
        "recorded_at": "2025-01-01T00:00:00+00:00",
        "level": "3.5",
        "site": "site-a",
        "program": "",
        "age_group": "adult",
        "delta": 1,
    }
    odd = {**row, "event_id": "e-3", "level": 4, "position": 3}  # an int in a text column
    with (
        caplog.at_level(logging.WARNING, logger="continuum.projections"),
        pg_engine.begin() as conn,
    ):
        rm._write(conn, d, [row])
        rm._write(conn, d, [{**row, "event_id": "e-2", "position": 2}, odd])
    assert "COPY rm_census_deltas: a value of another type" in caplog.text
    with pg_engine.connect() as conn:
        written = conn.execute(select(d.c.event_id, d.c.level).order_by(d.c.position)).all()
    assert written == [("e-1", "3.5"), ("e-2", "3.5"), ("e-3", "4")]


def test_copy_formats_follow_the_columns_sql_types_and_time_values() -> None:
    t = rm.transitions.c
    moment = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    types = [t.event_id.type, t.position.type, t.hours_scheduled.type, t.voided.type]
    assert rm._copy_formats(types, ["e", 1, 2.5, False]) == ["text", "int8", "float8", "bool"]
    times = [t.occurred_at.type, t.voided_at.type, rm.census_boundaries.c.boundary.type]
    assert rm._copy_formats(times, ["2025-01-01T00:00:00Z", None, moment]) == [
        "text",
        "text",
        "timestamptz",
    ]
