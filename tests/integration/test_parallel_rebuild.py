"""A rebuild split across processes by patient (`continuum_projections.parallel`) ends in
exactly the read model of a one-process rebuild; a stopped, failed or SIGKILLed shard leaves
checkpoints that the same rebuild goes on from; the ordinary runner refuses the read model until
the shards are merged, then goes on from their common position."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from continuum.adapters.sql.store import SqlEventStore
from continuum.application.ports import EventStore
from continuum.application.service import PatientService
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from continuum_projections import readmodel as rm
from continuum_projections.compare import diff_read_models
from continuum_projections.parallel import Opener, ShardFailed, rebuild
from continuum_projections.readmodel import ReadModel, ReadModelError
from continuum_projections.runners import StoreRunner, shard_checkpoint
from tests.support import (
    FixedClock,
    fresh_pg_schema,
    index_names,
    open_rebuild_parts,
    scratch_patient,
)

pytestmark = pytest.mark.postgres

SHARDS = 2


def _schema(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql("SELECT current_schema()").scalar())


@contextlib.contextmanager
def _open(
    url: str, store_schema: str, model_schema: str, fail_in_shard: bool = False
) -> Iterator[tuple[EventStore, ReadModel, PolicyRegistry]]:
    """The opener each shard's process calls (module level, so that it pickles); it can
    fail in the shards' processes only."""
    if fail_in_shard and multiprocessing.parent_process() is not None:
        raise RuntimeError("the shard's database is unreachable (injected)")
    with open_rebuild_parts(url, store_schema, model_schema) as parts:
        yield parts


class _Ticking(FixedClock):
    """A second later at every reading: events are recorded at distinct times, so census
    snapshots and as-of moments fall between them."""

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(seconds=1)
        return self.now


@pytest.fixture(scope="module")
def cohort(pg_url: str) -> Iterator[tuple[Engine, ReadModel, int]]:
    """A simulated log, its one-process rebuild (the reference) and the position that
    rebuild reached (tests rebuild up to there: one of them appends to the log)."""
    policies = PolicyRegistry.bundled()
    with fresh_pg_schema(pg_url, prefix="par_log") as engine:
        store = SqlEventStore(engine)
        clock = _Ticking(dt.datetime(2026, 6, 1, tzinfo=dt.UTC))
        simulate_cohort(PatientService(store, policies, clock), patients=150, days=150, seed=11)
        with fresh_pg_schema(pg_url, prefix="par_ref") as reference:
            model = ReadModel(reference)
            model.create()
            StoreRunner(store, model, policies).run()
            yield engine, model, store.head_position()


@contextlib.contextmanager
def _target(
    pg_url: str, log: Engine, prefix: str, *, fail_in_shard: bool = False
) -> Iterator[tuple[Engine, Opener]]:
    """A fresh schema to rebuild into, and the shards' opener for it and the log."""
    with fresh_pg_schema(pg_url, prefix=prefix) as target:
        yield target, functools.partial(_open, pg_url, _schema(log), _schema(target), fail_in_shard)


def _census_at_moments(engine: Engine) -> list[dict[tuple[str, str, str, str], int]]:
    with engine.connect() as conn:
        first, last = conn.execute(
            text("SELECT min(recorded_at), max(recorded_at) FROM rm_census_deltas")
        ).one()
        step = (last - first) / 7
        return [rm.census_as_of(conn, first + step * i) for i in range(8)]


def _assert_same(reference: ReadModel, built: ReadModel, head: int) -> None:
    assert diff_read_models(reference.engine, built.engine) == []
    assert _census_at_moments(built.engine) == _census_at_moments(reference.engine)
    assert built.checkpoints_like("store") == {"store": head, "store:state": head}
    assert built.source() == "store"


def _assert_snapshots_hold(engine: Engine, every: int) -> int:
    """Each census snapshot is the sum of the deltas recorded up to its boundary, and a
    boundary follows every `every` deltas; returns how many boundaries there are."""
    with engine.connect() as conn:
        boundaries = conn.execute(
            text("SELECT boundary, deltas FROM rm_census_boundaries ORDER BY boundary")
        ).all()
        for boundary, deltas in boundaries:
            assert deltas >= every
            kept = {
                (r[0], r[1], r[2], r[3]): r[4]
                for r in conn.execute(
                    text(
                        "SELECT level, site, program, age_group, count FROM rm_census_snapshots"
                        " WHERE boundary = :b"
                    ),
                    {"b": boundary},
                )
            }
            assert kept == {k: n for k, n in rm.census_totals(conn, boundary).items() if n}
        total = conn.execute(text("SELECT count(*) FROM rm_census_deltas")).scalar_one()
        assert sum(d for _, d in boundaries) > total - 2 * every
    return len(boundaries)


def test_two_shards_build_exactly_the_one_process_read_model(
    pg_url: str, cohort: tuple[Engine, ReadModel, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    log, reference, head = cohort
    store = SqlEventStore(log)
    assert head > 1_000
    # The shards write no snapshots; the merge (in this process) cuts them all at once.
    monkeypatch.setattr(rm, "SNAPSHOT_EVERY", 10)
    with _target(pg_url, log, "par_two") as (target, opener):
        seen: list[int] = []
        progress = rebuild(opener, SHARDS, until=head, on_progress=lambda p: seen.append(p.events))
        assert progress.events == head
        assert seen and seen[-1] == head
        built = ReadModel(target)
        _assert_same(reference, built, head)
        assert _assert_snapshots_hold(target, 10) >= 5
        # The query indexes, and the snapshot upkeep's, were built once, after the shards.
        assert index_names(target) >= rm.DEFERRED_INDEXES | rm.UPKEEP_INDEXES

        # The ordinary runner goes on from the merged checkpoint.
        policies = PolicyRegistry.bundled()
        events = scratch_patient(policies, attendances=1)
        store.append(events[0].stream_id, 0, events)
        follow_up = StoreRunner(store, built, policies).run()
        assert follow_up.events == len(events)
        assert built.checkpoint("store") == store.head_position()


def test_a_stopped_rebuild_is_refused_by_the_ordinary_runner_and_goes_on_when_run_again(
    pg_url: str, cohort: tuple[Engine, ReadModel, int]
) -> None:
    log, reference, head = cohort
    with _target(pg_url, log, "par_stop") as (target, opener):
        stop = threading.Event()

        def halt_early(p: object) -> None:
            stop.set()

        partial = rebuild(
            opener, SHARDS, until=head, on_progress=halt_early, stop=stop, flush_every=10, page=50
        )
        built = ReadModel(target)
        assert partial.position < head
        assert built.source() == f"store in {SHARDS} shards"
        assert "store" not in built.checkpoints_like("store")
        with pytest.raises(ReadModelError, match="store in 2 shards"):
            StoreRunner(SqlEventStore(log), built, PolicyRegistry.bundled())
        with pytest.raises(ReadModelError, match="cannot merge"):
            built.merge_checkpoints(
                [shard_checkpoint(i, SHARDS) for i in range(SHARDS)],
                "store",
                position=head,
                source=(f"store in {SHARDS} shards", "store"),
            )

        # The shards keep no snapshots: the index only their upkeep reads is not there yet.
        assert rm.UPKEEP_INDEXES and not rm.UPKEEP_INDEXES & index_names(target)

        rebuild(opener, SHARDS, until=head)
        _assert_same(reference, built, head)
        assert index_names(target) >= rm.UPKEEP_INDEXES


def test_a_failed_shard_stops_the_others_and_is_named(
    pg_url: str, cohort: tuple[Engine, ReadModel, int]
) -> None:
    log, _, head = cohort
    with _target(pg_url, log, "par_fail", fail_in_shard=True) as (target, opener):
        with pytest.raises(ShardFailed, match=r"shard \d of 2 failed: RuntimeError: the shard's"):
            rebuild(opener, SHARDS, until=head)
        assert ReadModel(target).checkpoints_like("store") == {}


def test_a_sigkilled_shard_is_reported_and_the_rebuild_goes_on_to_the_same_read_model(
    pg_url: str, cohort: tuple[Engine, ReadModel, int]
) -> None:
    log, reference, head = cohort
    with _target(pg_url, log, "par_kill") as (target, opener):
        built = ReadModel(target)
        errors = _signal_shard_midway(opener, built, head, signal.SIGKILL)
        assert len(errors) == 1 and isinstance(errors[0], ShardFailed), errors
        assert "exited with code -9" in str(errors[0])
        assert built.source() == f"store in {SHARDS} shards"

        rebuild(opener, SHARDS, until=head)
        _assert_same(reference, built, head)


def _signal_shard_midway(
    opener: Opener, model: ReadModel, head: int, signum: signal.Signals
) -> list[BaseException]:
    """Rebuild in small batches (so that the signal lands between commits of a running
    shard), send `signum` to shard 0 mid-way, and return what the rebuild raised."""
    model.create()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rebuild(opener, SHARDS, until=head, flush_every=10, page=50)
        except BaseException as exc:  # returned to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    os.kill(_shard_midway(model, head), signum)
    thread.join(timeout=120)
    assert not thread.is_alive()
    return errors


def _shard_midway(model: ReadModel, head: int, guard: float = 60.0) -> int:
    """Shard 0's process id, once it has committed a batch but is not half-way yet."""
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        saved = model.checkpoints_like(shard_checkpoint(0, SHARDS))
        children = [p for p in multiprocessing.active_children() if p.name == "rebuild-shard-0"]
        if saved and children and children[0].pid is not None:
            assert max(saved.values()) < head // 2, "shard 0 got too far before the kill"
            return children[0].pid
        time.sleep(0.001)
    raise AssertionError("shard 0 committed nothing within the guard time")


def test_ctrl_c_reaching_a_shard_leaves_the_stop_to_the_coordinator(
    pg_url: str, cohort: tuple[Engine, ReadModel, int]
) -> None:
    """A terminal's Ctrl-C goes to every process of the group. A shard ignores it (the
    coordinator stops the shards itself), so the run goes on, here to the end."""
    log, reference, head = cohort
    with _target(pg_url, log, "par_int") as (target, opener):
        built = ReadModel(target)
        assert _signal_shard_midway(opener, built, head, signal.SIGINT) == []
        _assert_same(reference, built, head)
