"""A projection worker killed with SIGKILL at random points, many times, ends in exactly the
state of a clean rebuild: its checkpoint is written in the same transaction as its rows, so no
event is lost or counted twice. Run against SQLite and PostgreSQL through the real CLI."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.service import PatientService
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from continuum_projections.compare import diff_read_models
from continuum_projections.readmodel import ReadModel
from continuum_projections.runners import StoreRunner
from tests.support import FixedClock, fresh_pg_schema

KILLS = 12
ATTEMPTS = 4
HANG_GUARD = 120.0


def _project(env: dict[str, str], n: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "continuum.entrypoints.cli", "project", f"--flush-every={n}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_and_finish(env: dict[str, str], model: ReadModel, head: int) -> list[int]:
    """Kill the worker mid-way at least twice, then let a last one finish. A busy machine
    can let a worker run to the end before the kill lands; then start again from nothing."""
    model.create()
    rng = random.Random(20261122)
    for _ in range(ATTEMPTS):
        seen = _kill_repeatedly(env, model, head, rng)
        if len(_midway(seen, head)) >= 2:
            break
        model.reset()
    final = _project(env, 50)
    _, stderr = final.communicate(timeout=HANG_GUARD)
    assert final.returncode == 0, stderr.decode()
    return seen


def _midway(seen: list[int], head: int) -> list[int]:
    return [p for p in seen if 0 < p < head]


def _kill_repeatedly(
    env: dict[str, str], model: ReadModel, head: int, rng: random.Random
) -> list[int]:
    seen: list[int] = []
    for _ in range(KILLS):
        # Kill once the worker has passed a random point (so that kills land mid-way whatever
        # the machine's speed), a random few milliseconds later: inside a batch, between
        # batches, or during a commit.
        done = model.checkpoint("store")
        target = done + rng.randint(1, max(1, (head - done) // 4))
        proc = _project(env, rng.choice([1, 2, 3]))
        deadline = time.monotonic() + HANG_GUARD
        while model.checkpoint("store") < target and proc.poll() is None:
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=HANG_GUARD)
        seen.append(model.checkpoint("store"))
        if seen[-1] >= head - 1:
            break
    return seen


def _cohort(engine: Engine, policies: PolicyRegistry) -> SqlEventStore:
    store = SqlEventStore(engine)
    clock = FixedClock(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=120, days=150, seed=9)
    return store


def _check(store: SqlEventStore, live: Engine, policies: PolicyRegistry, seen: list[int]) -> None:
    assert store.head_position() > 1_000
    # Killed mid-way at least twice (not only before the first or after the last commit).
    assert len(_midway(seen, store.head_position())) >= 2, seen
    clean = create_database_engine("sqlite://")
    rebuilt = ReadModel(clean)
    rebuilt.create()
    StoreRunner(store, rebuilt, policies).run()
    assert diff_read_models(clean, live) == []
    assert ReadModel(live).checkpoint("store") == store.head_position()


def test_sigkilled_worker_on_sqlite_equals_a_clean_rebuild(
    tmp_path: Path, policies: PolicyRegistry
) -> None:
    url = f"sqlite:///{tmp_path / 'crash.sqlite3'}"
    engine = create_database_engine(url)
    from continuum.adapters.sql.migrate import upgrade

    upgrade(engine)
    store = _cohort(engine, policies)
    model = ReadModel(engine)
    env = {**os.environ, "CONTINUUM_DATABASE_URL": url}
    seen = _kill_and_finish(env, model, store.head_position())
    _check(store, engine, policies, seen)


def _pg_env(pg_url: str, engine: Engine) -> dict[str, str]:
    """Environment for a `continuum` subprocess using this engine's schema."""
    with engine.connect() as conn:
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar()
    return {**os.environ, "CONTINUUM_DATABASE_URL": pg_url, "PGOPTIONS": f"-csearch_path={schema}"}


@pytest.mark.postgres
def test_sigkilled_worker_on_postgresql_equals_a_clean_rebuild(
    pg_url: str, policies: PolicyRegistry
) -> None:
    with fresh_pg_schema(pg_url, prefix="crash") as engine:
        store = _cohort(engine, policies)
        env = _pg_env(pg_url, engine)
        model = ReadModel(engine)
        seen = _kill_and_finish(env, model, store.head_position())
        _check(store, engine, policies, seen)


@pytest.mark.postgres
def test_following_worker_projects_new_events_and_stops_cleanly_on_sigterm(
    pg_url: str, policies: PolicyRegistry
) -> None:
    from tests.support import scratch_patient

    with fresh_pg_schema(pg_url, prefix="follow") as engine:
        env = _pg_env(pg_url, engine)
        model = ReadModel(engine)
        model.create()
        proc = subprocess.Popen(
            [sys.executable, "-m", "continuum.entrypoints.cli", "project", "--follow"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            store = SqlEventStore(engine)
            for _ in range(3):
                events = scratch_patient(policies, attendances=2)
                store.append(events[0].stream_id, 0, events)
                deadline = time.monotonic() + HANG_GUARD
                while model.checkpoint("store") < store.head_position():
                    assert proc.poll() is None, proc.communicate()[1].decode()
                    assert time.monotonic() < deadline, "the follower did not project the append"
                    time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=HANG_GUARD)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "projected 9 events; lag 0" in out.decode()
        with engine.connect() as conn:
            from continuum_projections import reports

            assert reports.current_census(conn).total == 3
