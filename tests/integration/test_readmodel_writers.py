"""Several projection workers (one Kafka consumer group) write ONE read model: each has its own
`ReadModel` (its own process and connection). Their batches interleave, and the census
snapshots that bound an as-of query must still equal the sum of every delta recorded at or
before them, whoever wrote the delta and whoever cut the snapshot. Also: workers starting on a
new read model at the same moment all create and claim it without tripping over each other.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, func, select

from continuum.adapters.sql.database import create_database_engine
from continuum_projections import readmodel as rm
from continuum_projections.fold import Changes, Row
from continuum_projections.readmodel import Batch, ReadModel
from tests.support import fresh_pg_schema

T0 = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
LEVELS = ("3.5", "2.1")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engines(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two engines on one database, as two worker processes would have."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'rm.sqlite3'}"
        a, b = create_database_engine(url), create_database_engine(url)
        yield a, b
        a.dispose()
        b.dispose()
        return
    pg_url: str = request.getfixturevalue("pg_url")
    with fresh_pg_schema(pg_url, migrate=False) as a:
        with a.connect() as conn:
            schema = str(conn.exec_driver_sql("SELECT current_schema()").scalar())
        b = create_database_engine(pg_url, schema=schema)
        yield a, b
        b.dispose()


def _delta(n: int, minute: int, level: str, delta: int) -> Row:
    return {
        "event_id": f"ev-{n}",
        "position": n,
        "recorded_at": (T0 + dt.timedelta(minutes=minute)).isoformat(),
        "level": level,
        "site": "site-a",
        "program": "-",
        "age_group": "adult",
        "delta": delta,
    }


def _write(model: ReadModel, deltas: list[Row], checkpoint: str, position: int) -> None:
    changes = Changes(deltas=deltas)
    model.write(Batch(changes=changes, new_patients=[], old_patients=[]), {checkpoint: position})


def _brute_force(conn: Connection, moment: dt.datetime) -> dict[tuple[str, str, str, str], int]:
    """The census at `moment` straight from every delta, no snapshot involved."""
    d = rm.census_deltas
    keys = [d.c[k] for k in rm.CENSUS_KEY]
    rows = conn.execute(
        select(*keys, func.sum(d.c.delta)).where(d.c.recorded_at <= moment).group_by(*keys)
    ).all()
    return {(r[0], r[1], r[2], r[3]): int(r[4]) for r in rows if int(r[4])}


def test_interleaved_workers_keep_every_census_snapshot_exact(
    engines: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rm, "SNAPSHOT_EVERY", 4)
    a_engine, b_engine = engines
    worker_a, worker_b = ReadModel(a_engine), ReadModel(b_engine)
    worker_a.create()
    worker_b.create()
    # B writes first (and so learns "no snapshot yet"); A then writes enough to cut one;
    # B then writes deltas recorded before A's boundary (its partitions lag behind A's).
    _write(worker_b, [_delta(1, 1, LEVELS[0], 1)], "kafka:t:1", 1)
    _write(worker_a, [_delta(n, 10 + n, LEVELS[n % 2], 1) for n in range(2, 8)], "kafka:t:0", 6)
    with a_engine.connect() as conn:
        boundaries = conn.execute(select(rm.census_boundaries.c.boundary)).scalars().all()
    assert boundaries, "worker A should have cut a census snapshot"
    _write(worker_b, [_delta(8, 2, LEVELS[1], 1), _delta(9, 3, LEVELS[0], 1)], "kafka:t:1", 3)
    # ...and both go on, each cutting snapshots while the other writes late deltas.
    _write(worker_a, [_delta(n, 20 + n, LEVELS[n % 2], 1) for n in range(10, 16)], "kafka:t:0", 12)
    _write(worker_b, [_delta(16, 4, LEVELS[0], -1), _delta(17, 5, LEVELS[1], 1)], "kafka:t:1", 5)
    _write(worker_b, [_delta(n, 40 + n, LEVELS[0], 1) for n in range(18, 24)], "kafka:t:1", 11)
    _write(worker_a, [_delta(24, 6, LEVELS[1], 1), _delta(25, 30, LEVELS[0], -1)], "kafka:t:0", 14)

    with a_engine.connect() as conn:
        cut = conn.execute(select(func.count()).select_from(rm.census_boundaries)).scalar()
        assert cut is not None and cut >= 2
        for minute in range(0, 70):
            moment = T0 + dt.timedelta(minutes=minute, seconds=30)
            assert rm.census_as_of(conn, moment) == _brute_force(conn, moment), moment
    assert worker_a.checkpoints_like("kafka:t:") == {"kafka:t:0": 14, "kafka:t:1": 11}


def test_workers_starting_together_create_and_claim_one_read_model(
    engines: tuple[Engine, Engine],
) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(engine: Engine) -> None:
        try:
            model = ReadModel(engine)
            start.wait()
            model.create()
            model.claim("kafka:events")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(e,)) for e in (*engines, *engines)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert ReadModel(engines[0]).source() == "kafka:events"


def test_a_stale_batch_is_fenced_and_writes_nothing(engines: tuple[Engine, Engine]) -> None:
    """Worker A stalled with a batch of partition 0 read from offset 0; meanwhile the group
    gave the partition to B, which projected offsets 0-5. A's batch must not land (it would
    count those events twice): StaleBatch, and none of its rows or its checkpoint."""
    a_engine, b_engine = engines
    worker_a, worker_b = ReadModel(a_engine), ReadModel(b_engine)
    worker_a.create()
    name = "kafka:t:0"
    b_rows = [_delta(n, n, LEVELS[0], 1) for n in range(6)]
    worker_b.write(
        Batch(changes=Changes(deltas=b_rows), new_patients=[], old_patients=[]),
        {name: 6},
        {name: 0},
    )
    stale = [_delta(100 + n, n, LEVELS[1], 1) for n in range(4)]
    with pytest.raises(rm.StaleBatch, match=r"kafka:t:0 is at 6, past 0 where this batch began"):
        worker_a.write(
            Batch(changes=Changes(deltas=stale), new_patients=[], old_patients=[]),
            {name: 4},
            {name: 0},
        )
    with a_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(rm.census_deltas)).scalar() == 6
    assert worker_a.checkpoints_like("kafka:t:") == {name: 6}
    # A batch that begins where the checkpoint stands goes through.
    worker_a.write(
        Batch(
            changes=Changes(deltas=[_delta(6, 7, LEVELS[1], 1)]), new_patients=[], old_patients=[]
        ),
        {name: 7},
        {name: 6},
    )
    assert worker_b.checkpoints_like("kafka:t:") == {name: 7}


@pytest.mark.postgres
def test_a_checkpoint_created_by_another_writer_mid_batch_fences_the_batch(
    pg_url: str,
) -> None:
    """The race for a partition's first checkpoint: B creates it after A found none but
    before A inserts it. A's insert must not fail on the key, nor overwrite: StaleBatch."""
    from sqlalchemy import event

    with fresh_pg_schema(pg_url, migrate=False) as a_engine:
        with a_engine.connect() as conn:
            schema = str(conn.exec_driver_sql("SELECT current_schema()").scalar())
        b_engine = create_database_engine(pg_url, schema=schema)
        worker_a, worker_b = ReadModel(a_engine), ReadModel(b_engine)
        worker_a.create()
        name = "kafka:t:3"
        raced: list[bool] = []

        @event.listens_for(a_engine, "before_cursor_execute")
        def b_gets_there_first(*args: object) -> None:
            statement = str(args[2])
            if statement.startswith("INSERT INTO rm_checkpoints") and not raced:
                raced.append(True)
                # (no deltas: A holds the snapshot lock until it commits)
                _write(worker_b, [], name, 2)

        with pytest.raises(rm.StaleBatch, match="created by another writer"):
            worker_a.write(
                Batch(
                    changes=Changes(deltas=[_delta(9, 2, LEVELS[1], 1)]),
                    new_patients=[],
                    old_patients=[],
                ),
                {name: 2},
                {name: 0},
            )
        assert raced
        assert worker_a.checkpoints_like("kafka:t:") == {name: 2}
        with a_engine.connect() as conn:
            events = conn.execute(select(rm.census_deltas.c.event_id)).scalars().all()
        assert events == []  # nothing of A's batch
        b_engine.dispose()
