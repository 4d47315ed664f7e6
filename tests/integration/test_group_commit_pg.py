"""Group commit on PostgreSQL: concurrent appends share transactions, each caller still gets
exactly its own result or its own error, and nothing is ever half-written.

Batches are made deterministic without timing: a SQLAlchemy `commit` hook holds one
transaction's COMMIT while the test queues more appends behind it (max_in_flight=1), and the
hook counts COMMITs, so the test sees how many transactions carried the appends.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import DBAPIError

from continuum.adapters.sql.store import SqlEventStore
from continuum.application.ports import AppendResult
from continuum.application.service import new_patient_key
from continuum.domain.errors import ConcurrencyConflict, Duplicate
from continuum.domain.policy import PolicyRegistry
from continuum_events import PatientEvent
from tests.support import fresh_pg_schema, scratch_patient

pytestmark = pytest.mark.postgres

WAIT = 30.0  # seconds: only a guard against hangs, never a measure of speed


@pytest.fixture
def template(policies: PolicyRegistry) -> list[PatientEvent]:
    return scratch_patient(policies, 1)


def events_for(
    template: list[PatientEvent], stream_id: str, first: int, count: int = 1
) -> list[PatientEvent]:
    return [
        (template[0] if v == 1 else template[1]).model_copy(
            update={"event_id": uuid.uuid4(), "stream_id": stream_id, "stream_version": v}
        )
        for v in range(first, first + count)
    ]


class Hold:
    def __init__(self) -> None:
        self.held = threading.Event()
        self.release = threading.Event()


class Commits:
    """Counts COMMITs on an engine, and holds the next ones (one `Hold` each) until released."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        self._holds: list[Hold] = []
        self._lock = threading.Lock()
        event.listen(engine, "commit", self)

    def hold_next(self) -> Hold:
        hold = Hold()
        with self._lock:
            self._holds.append(hold)
        return hold

    def __call__(self, conn: Connection) -> None:
        with self._lock:
            self.count += 1
            hold = self._holds.pop(0) if self._holds else None
        if hold is not None:
            hold.held.set()
            assert hold.release.wait(WAIT)


@pytest.fixture
def commits(pg_engine: Engine) -> Iterator[Commits]:
    control = Commits(pg_engine)
    yield control
    event.remove(pg_engine, "commit", control)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # the test checks the type
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def queued(store: SqlEventStore) -> int:
    assert store._group is not None
    return len(store._group._queue)


def log_ids(engine: Engine) -> list[str]:
    SqlEventStore(engine).sequence()
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT l.position, e.event_id FROM event_log l JOIN events e USING (row_id) "
                "ORDER BY l.position"
            )
        ).all()
    assert [p for p, _ in rows] == list(range(1, len(rows) + 1))  # dense
    return [str(i) for _, i in rows]


def test_appends_queued_behind_a_transaction_commit_together_each_with_its_own_result(
    pg_engine: Engine, commits: Commits, template: list[PatientEvent]
) -> None:
    store = SqlEventStore(pg_engine, max_in_flight=1)
    first_pk = new_patient_key()
    hold = commits.hold_next()
    first, first_out = in_thread(
        lambda: store.append(first_pk, 0, events_for(template, first_pk, 1))
    )
    assert hold.held.wait(WAIT)

    # Behind the held transaction: six appends to new streams, one with two events, one to a
    # stream with a stale expected version, and a second append to one of the six streams.
    pks = [new_patient_key() for _ in range(6)]
    batches = [events_for(template, pk, 1, 2 if n == 0 else 1) for n, pk in enumerate(pks)]
    runs = [
        in_thread(lambda pk=pk, b=b: store.append(pk, 0, b))
        for pk, b in zip(pks, batches, strict=True)
    ]
    stale, stale_out = in_thread(
        lambda: store.append(first_pk, 5, events_for(template, first_pk, 6))
    )
    wait_until(lambda: queued(store) == 7)
    again, again_out = in_thread(lambda: store.append(pks[1], 0, events_for(template, pks[1], 1)))
    wait_until(lambda: queued(store) == 8)
    hold.release.set()
    for thread in [first, *(t for t, _ in runs), stale, again]:
        thread.join(WAIT)
        assert not thread.is_alive()

    # The first append, then one transaction for the seven that could share one, then the
    # second append to pks[1], which had to wait for the first one's outcome.
    assert commits.count == 3
    assert isinstance(first_out[0], AppendResult)
    for (_, out), pk, batch in zip(runs, pks, batches, strict=True):
        result = out[0]
        assert isinstance(result, AppendResult), result
        assert result.stream_id == pk
        assert [e.event_id for e in result.events] == [e.event_id for e in batch]
        assert result.stream_version == len(batch)
    assert isinstance(stale_out[0], ConcurrencyConflict)
    assert (stale_out[0].expected, stale_out[0].actual) == (5, 1)
    assert isinstance(again_out[0], ConcurrencyConflict)
    assert (again_out[0].expected, again_out[0].actual) == (0, 1)
    # Exactly the successful appends are in the log, once each, densely numbered.
    expected_ids = [str(e.event_id) for b in batches for e in b]
    assert sorted(log_ids(pg_engine)) == sorted(
        [str(first_out[0].events[0].event_id), *expected_ids]
    )


def test_many_writers_racing_for_one_stream_exactly_one_wins_each_version(
    pg_engine: Engine, template: list[PatientEvent]
) -> None:
    store = SqlEventStore(pg_engine)
    contested = new_patient_key()
    writers, rounds = 8, 12
    barrier = threading.Barrier(writers)
    outcomes: dict[int, list[tuple[int, object]]] = {n: [] for n in range(writers)}
    own: dict[int, str] = {n: new_patient_key() for n in range(writers)}

    def write(n: int) -> None:
        for version in range(rounds):
            barrier.wait(WAIT)
            store.append(own[n], version, events_for(template, own[n], version + 1))
            try:
                outcome: object = store.append(
                    contested, version, events_for(template, contested, version + 1)
                )
            except ConcurrencyConflict as exc:
                outcome = exc
            outcomes[n].append((version, outcome))

    threads = [threading.Thread(target=write, args=(n,), daemon=True) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
        assert not thread.is_alive()

    winners: list[str] = []
    for version in range(rounds):
        this_round = [o for n in range(writers) for v, o in outcomes[n] if v == version]
        won = [o for o in this_round if isinstance(o, AppendResult)]
        lost = [o for o in this_round if isinstance(o, ConcurrencyConflict)]
        assert len(won) == 1 and len(lost) == writers - 1, (version, this_round)
        assert won[0].stream_version == version + 1
        assert all((c.expected, c.actual) == (version, version + 1) for c in lost)
        winners.append(str(won[0].events[0].event_id))
    assert [str(e.event_id) for e in store.read_stream(contested)] == winners
    for pk in own.values():
        assert [e.stream_version for e in store.read_stream(pk)] == list(range(1, rounds + 1))
    assert len(log_ids(pg_engine)) == rounds * (writers + 1)


def test_a_statement_error_in_a_batch_falls_back_to_one_by_one_with_each_callers_own_error(
    pg_engine: Engine, commits: Commits, template: list[PatientEvent]
) -> None:
    store = SqlEventStore(pg_engine, max_in_flight=1)
    stored_pk = new_patient_key()
    stored = events_for(template, stored_pk, 1)
    store.append(stored_pk, 0, stored)

    hold = commits.hold_next()
    warmup_pk = new_patient_key()
    first, _ = in_thread(lambda: store.append(warmup_pk, 0, events_for(template, warmup_pk, 1)))
    assert hold.held.wait(WAIT)
    good_a, clash, good_b = new_patient_key(), new_patient_key(), new_patient_key()
    a_events = events_for(template, good_a, 1, 2)
    # Its second event reuses an id already stored: the batch statement fails as a whole.
    clash_events = [
        events_for(template, clash, 1)[0],
        events_for(template, clash, 2)[0].model_copy(update={"event_id": stored[0].event_id}),
    ]
    b_events = events_for(template, good_b, 1)
    runs = [
        in_thread(lambda: store.append(good_a, 0, a_events)),
        in_thread(lambda: store.append(clash, 0, clash_events)),
        in_thread(lambda: store.append(good_b, 0, b_events)),
    ]
    wait_until(lambda: queued(store) == 3)
    rollbacks: list[int] = []
    event.listen(pg_engine, "rollback", lambda conn: rollbacks.append(1))
    hold.release.set()
    for thread in [first, *(t for t, _ in runs)]:
        thread.join(WAIT)
        assert not thread.is_alive()

    (_, a_out), (_, clash_out), (_, b_out) = runs
    assert isinstance(a_out[0], AppendResult)
    assert [e.event_id for e in a_out[0].events] == [e.event_id for e in a_events]
    assert isinstance(b_out[0], AppendResult)
    assert isinstance(clash_out[0], Duplicate)
    assert clash_out[0].rule == "event.duplicate_id"
    assert rollbacks  # the shared attempt was rolled back before the one-by-one retries
    # Nothing of the refused append was written, and the others were written once.
    assert store.read_stream(clash) == []
    ids = log_ids(pg_engine)
    assert len(ids) == len(set(ids)) == 1 + 1 + 2 + 1
    assert {str(e.event_id) for e in [*a_events, *b_events]} <= set(ids)


def test_a_stream_taken_by_another_process_meanwhile_is_that_callers_conflict_only(
    pg_engine: Engine, commits: Commits, template: list[PatientEvent]
) -> None:
    """Another store (as another process would) appends version 1 of a stream while our batch,
    whose snapshot predates that commit, inserts it too: the unique key refuses our batch, the
    requests are retried one by one, and only that request's caller gets the conflict."""
    ours = SqlEventStore(pg_engine, max_in_flight=1)
    theirs = SqlEventStore(pg_engine)
    contested, free_a, free_b = new_patient_key(), new_patient_key(), new_patient_key()

    # Their append of the contested stream inserts and then waits, uncommitted.
    theirs_hold = commits.hold_next()
    their_run, their_out = in_thread(
        lambda: theirs.append(contested, 0, events_for(template, contested, 1))
    )
    assert theirs_hold.held.wait(WAIT)
    # Our three appends queue behind a transaction of ours held at COMMIT, so they share the
    # next batch. Its version check cannot see their uncommitted row; its insert of the
    # contested stream then waits on their unique-key entry.
    ours_hold = commits.hold_next()
    warmup_pk = new_patient_key()
    warmup, _ = in_thread(lambda: ours.append(warmup_pk, 0, events_for(template, warmup_pk, 1)))
    assert ours_hold.held.wait(WAIT)
    runs = [
        in_thread(lambda pk=pk: ours.append(pk, 0, events_for(template, pk, 1)))
        for pk in (contested, free_a, free_b)
    ]
    wait_until(lambda: queued(ours) == 3)
    ours_hold.release.set()
    waiting = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'")
    with pg_engine.connect() as probe:
        wait_until(lambda: probe.scalar(waiting) == 1)
        probe.rollback()
    theirs_hold.release.set()  # they commit; our batch fails on the unique key
    for thread in [their_run, warmup, *(t for t, _ in runs)]:
        thread.join(WAIT)
        assert not thread.is_alive()

    assert isinstance(their_out[0], AppendResult)
    (_, contested_out), (_, a_out), (_, b_out) = runs
    assert isinstance(contested_out[0], ConcurrencyConflict)
    assert (contested_out[0].expected, contested_out[0].actual) == (0, 1)
    assert isinstance(a_out[0], AppendResult)
    assert isinstance(b_out[0], AppendResult)
    assert [e.event_id for e in ours.read_stream(contested)] == [their_out[0].events[0].event_id]
    assert len(log_ids(pg_engine)) == 4


def _kill_pooled_connection(pg_url: str, engine: Engine) -> None:
    """Terminate the backend of `engine`'s one pooled connection, and wait until it is gone."""
    with engine.connect() as conn:  # the pool's one connection
        pid = conn.scalar(text("SELECT pg_backend_pid()"))
    with fresh_pg_schema(pg_url, migrate=False) as admin, admin.connect() as conn:
        assert conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

        def backend_gone() -> bool:
            # pg_stat_activity is a snapshot held for the whole transaction: drop it on
            # every poll, or a backend still present at the first look never goes away.
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            count = conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            )
            return count == 0

        wait_until(backend_gone)
        conn.rollback()


def test_a_dead_pooled_connection_is_replaced_and_the_append_goes_through(
    pg_url: str, template: list[PatientEvent]
) -> None:
    with fresh_pg_schema(pg_url, pool_size=1) as engine:
        store = SqlEventStore(engine)
        pk = new_patient_key()
        store.append(pk, 0, events_for(template, pk, 1))
        _kill_pooled_connection(pg_url, engine)
        # The pooled connection is dead; the append finds out, replaces it and goes through.
        result = store.append(pk, 1, events_for(template, pk, 2))
        assert result.stream_version == 2
        assert [e.stream_version for e in store.read_stream(pk)] == [1, 2]


def test_a_stream_read_on_a_dead_connection_fails_as_sqlalchemys_error_and_the_next_works(
    pg_url: str, template: list[PatientEvent]
) -> None:
    """`read_stream` runs on the driver's connection: a dead one still surfaces as SQLAlchemy's
    DBAPIError (which the API answers with 503), and the pool replaces it for the next read."""
    with fresh_pg_schema(pg_url, pool_size=1) as engine:
        store = SqlEventStore(engine)
        pk = new_patient_key()
        store.append(pk, 0, events_for(template, pk, 1))
        store.append(pk, 1, events_for(template, pk, 2))
        _kill_pooled_connection(pg_url, engine)
        with pytest.raises(DBAPIError) as caught:
            store.read_stream(pk)
        assert caught.value.connection_invalidated
        assert pk not in str(caught.value)  # parameters (clinical keys) are not shown
        assert [e.stream_version for e in store.read_stream(pk)] == [1, 2]
