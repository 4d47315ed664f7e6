"""The SQL event store: one code path for SQLite and PostgreSQL.

Global order without a global writer lock
-----------------------------------------
A position taken from a sequence at insert time is unsafe: writer A takes 10, writer B takes
11, B commits first, a tailing reader sees 11 and moves its checkpoint past 10 before A commits.
Locking the table for every insert (what most stores do) fixes that by serializing all writers.

Here writers never wait on each other. An append inserts its events and one `event_pending`
row each, and commits. Positions are assigned afterwards by a *sequencer*: a transaction that
holds the sequencer lock (a PostgreSQL transaction-level advisory lock), reads the pending rows
that are visible to it, i.e. committed, numbers them max(position)+1, +2, ... in row order,
writes them to `event_log` and removes them from `event_pending`. Because only committed rows
are ever numbered, and numbering is serialized by the lock, a position becomes visible only
when every lower position already is: a reader tailing `event_log` cannot skip anything, and
positions are dense (no gaps from rolled-back transactions).

Who sequences: a writer tries the lock *without waiting* (`pg_try_advisory_xact_lock`), in a
statement of its own at the start of its transaction. If it gets it, its append statement
(whose snapshot is taken after the lock was got, so it sees the previous sequencer's commit)
numbers everything pending together with its own rows, which then become visible atomically
with its commit. A writer that finds the lock taken leaves its rows pending and commits.
Readers (`read_all`, `sequence`) take the lock *waiting*, so whatever a writer left pending is
numbered before anyone reads by position. Per-patient order holds because a stream's version
k+1 is inserted only after version k committed, so k always gets the lower position.

SQLite serializes writers itself (every write transaction begins IMMEDIATE), so there the
writer holds the database's lock and numbers its own events at once: nothing is ever pending.

Group commit: concurrent plain appends on one store share transactions (group_commit.py). A
batch carries at most one request per stream, checks each request's expected version on its
own and inserts only the requests that match, so each caller gets exactly its own result or
its own ConcurrencyConflict, while one statement and one COMMIT (one WAL flush) serve them
all. If a statement fails (nothing is then written), the requests are retried one by one, so
that each caller gets its own exact error. Appends with an idempotency key or an identity run
alone. The appends run on the driver's connection, inside a SQLAlchemy transaction (whose
events still fire): SQLAlchemy's per-statement work cost more than the statements.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Engine,
    Row,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.types import TypeEngine

from continuum.adapters.sql import tables as t
from continuum.adapters.sql.database import BEGIN_MODE, is_sqlite
from continuum.adapters.sql.group_commit import GroupCommit
from continuum.application.ports import AppendResult, Checkpoints, EventStore, WireEvent
from continuum.domain.commands import Identity
from continuum.domain.errors import ConcurrencyConflict, Duplicate
from continuum_events import PatientEvent, parse_event, wire

#: The PostgreSQL advisory lock that serializes numbering, one per schema.
_SEQUENCER_KEY = "hashtext('continuum.sequencer:' || current_schema())"

_EVENT_COLUMNS = (
    t.events.c.row_id,
    t.events.c.event_id,
    t.events.c.event_type,
    t.events.c.schema_version,
    t.events.c.stream_id,
    t.events.c.stream_version,
    t.events.c.occurred_at,
    t.events.c.recorded_at,
    t.events.c.actor_id,
    t.events.c.actor_role,
    t.events.c.correlation_id,
    t.events.c.causation_id,
    t.events.c.policy_id,
    t.events.c.policy_version,
    t.events.c.data,
)


# -- prebuilt statements for the append path (built once: no per-call construction cost) -------

_COLUMNS = (
    "event_id, stream_id, stream_version, event_type, schema_version, occurred_at, "
    "recorded_at, actor_id, actor_role, correlation_id, causation_id, policy_id, "
    "policy_version, data, body"
)
_COLUMN_NAMES = tuple(name.strip() for name in _COLUMNS.split(","))
#: Drains every visible pending row into the log, numbered after the current maximum (readers
#: run it after taking the sequencer lock, waiting).
_PG_SEQUENCE = text(
    """
    WITH drained AS (DELETE FROM event_pending RETURNING row_id),
    top AS (SELECT coalesce(max(position), 0) AS p FROM event_log)
    INSERT INTO event_log (position, row_id)
    SELECT top.p + row_number() OVER (ORDER BY drained.row_id), drained.row_id
    FROM drained, top
    RETURNING position, row_id
    """
)

# PostgreSQL appends: a writer first tries the sequencer lock, without waiting, in a statement
# of its own; then one statement appends a whole batch of requests (group commit), in one of
# two forms chosen by that answer. With the lock, the append statement numbers the batch's
# events together with every committed pending row (its snapshot is taken after the lock was
# got, so it sees the previous sequencer's commit); without it, it leaves them pending.

#: Also makes the server use the append statement's generic plan, prepared once per connection:
#: with its parameters (and the custom plans they allow) it would plan afresh for every append,
#: which costs more than executing it.
_PG_TRY_LOCK = (
    f"SELECT pg_try_advisory_xact_lock({_SEQUENCER_KEY}), "
    "set_config('plan_cache_mode', 'force_generic_plan', true)"
)

#: Each event is sent as one parameter, its wire body (the canonical JSON, "position": null),
#: and the server takes the columns from it: a parameter per column would cost more Python
#: (dumping ~15 values per event) than the server spends extracting them.
_FROM_BODY = {
    "event_id": "b->>'event_id'",
    "stream_id": "b->>'stream_id'",
    "stream_version": "(b->>'stream_version')::int",
    "event_type": "b->>'event_type'",
    "schema_version": "(b->>'schema_version')::int",
    "occurred_at": "(b->>'occurred_at')::timestamptz",
    "recorded_at": "(b->>'recorded_at')::timestamptz",
    "actor_id": "b->'actor'->>'id'",
    "actor_role": "b->'actor'->>'role'",
    "correlation_id": "b->>'correlation_id'",
    "causation_id": "b->>'causation_id'",
    "policy_id": "b->'policy'->>'id'",
    "policy_version": "b->'policy'->>'version'",
    "data": "b->'data'",
    "body": "x.body",
}
#: Without the lock: the events wait in event_pending for the next sequencer.
_PG_LEAVE_PENDING = """
    pending AS (INSERT INTO event_pending (row_id) SELECT row_id FROM inserted)
    SELECT request.actual, mine.row_ids, NULL::bigint[]
    FROM request LEFT JOIN (
        SELECT stream_id, array_agg(row_id ORDER BY stream_version) AS row_ids
        FROM inserted GROUP BY stream_id
    ) mine ON mine.stream_id = request.stream_id
    ORDER BY request.n
"""
#: With the lock: the pending rows and the batch's own events are numbered in row_id order.
#: The empty insert into event_pending fires its statement trigger (the NOTIFY relays wait on),
#: as an append that leaves its events pending does.
_PG_NUMBER_NOW = """
    notify AS (INSERT INTO event_pending (row_id) SELECT row_id FROM inserted WHERE false),
    drained AS (DELETE FROM event_pending RETURNING row_id),
    numbered AS (
        INSERT INTO event_log (position, row_id)
        SELECT top.p + row_number() OVER (ORDER BY u.row_id), u.row_id
        FROM (SELECT row_id FROM drained UNION ALL SELECT row_id FROM inserted) AS u,
             (SELECT coalesce(max(position), 0) AS p FROM event_log) AS top
        RETURNING position, row_id
    )
    SELECT request.actual, mine.row_ids, mine.positions
    FROM request LEFT JOIN (
        SELECT i.stream_id, array_agg(i.row_id ORDER BY i.stream_version) AS row_ids,
               array_agg(n.position ORDER BY i.stream_version) AS positions
        FROM inserted i JOIN numbered n ON n.row_id = i.row_id GROUP BY i.stream_id
    ) mine ON mine.stream_id = request.stream_id
    ORDER BY request.n
"""


@functools.lru_cache(maxsize=256)
def _pg_batch_sql(shape: tuple[int, ...], number_now: bool) -> str:
    """The append statement for requests carrying `shape[i]` events each (one per stream).

    Each request's stream version is checked against its expected version, and only matching
    requests' events are inserted. One row per request comes back: the version it saw, and
    the row ids (and positions, if numbered) of its events, or nulls if the check failed.
    Parameters are scalars, which psycopg dumps in C (an array parameter costs ~10 us of
    Python each), so the text depends on the batch's shape; psycopg prepares each text on the
    server once it is used repeatedly."""
    requests = ", ".join(f"({n}, %s::text, %s::int)" for n in range(1, len(shape) + 1))
    numbers = [n for n, count in enumerate(shape, start=1) for _ in range(count)]
    rows = ", ".join(f"({n}, {o}, %s::text)" for o, n in enumerate(numbers, start=1))
    return f"""
    WITH request AS MATERIALIZED (
        SELECT r.n, r.stream_id, r.expected, coalesce((
            SELECT e.stream_version FROM events e WHERE e.stream_id = r.stream_id
            ORDER BY e.stream_version DESC LIMIT 1), 0) AS actual
        FROM (VALUES {requests}) AS r(n, stream_id, expected)
    ), inserted AS (
        INSERT INTO events ({", ".join(_FROM_BODY)})
        SELECT {", ".join(_FROM_BODY.values())}
        FROM (VALUES {rows}) AS x(n, ord, body)
        JOIN request ON request.n = x.n AND request.actual = request.expected
        CROSS JOIN LATERAL (SELECT x.body::jsonb AS b OFFSET 0) AS parsed
        ORDER BY x.ord
        RETURNING row_id, stream_id, stream_version
    ), {_PG_NUMBER_NOW if number_now else _PG_LEAVE_PENDING}"""


#: SQLite appends run on the driver's connection (qmark parameters), inside BEGIN IMMEDIATE:
#: the writer holds the database's write lock, so it can read the stream's version and the
#: top position, then insert and number its events, with no race.
_SQLITE_VERSION = (
    "SELECT stream_version FROM events WHERE stream_id = ? ORDER BY stream_version DESC LIMIT 1"
)
_SQLITE_TOP = "SELECT coalesce(max(position), 0) FROM event_log"
_SQLITE_INSERT = f"INSERT INTO events ({_COLUMNS}) VALUES ({', '.join('?' * 15)})"
_SQLITE_LOG = "INSERT INTO event_log (position, row_id) VALUES (?, ?)"
_INSERT_IDEMPOTENCY = insert(t.idempotency_keys).values(
    key=bindparam("key"),
    request_hash=bindparam("request_hash"),
    stream_id=bindparam("stream_id"),
    event_ids=bindparam("event_ids", type_=JSON),
    recorded_at=bindparam("recorded_at", type_=DateTime(timezone=True)),
)

#: One patient's events in version order (built once: constructing a select per call cost
#: more than running it). The position comes from a correlated subquery, not a join: once the
#: statement is prepared, PostgreSQL may keep a generic plan, and with the per-stream row
#: estimate of a young table that plan hash-joined the whole event log (115 ms per read at
#: 120,000 events); a subquery can only be an index probe per event.
_READ_STREAM = (
    select(
        *_EVENT_COLUMNS,
        select(t.event_log.c.position)
        .where(t.event_log.c.row_id == t.events.c.row_id)
        .scalar_subquery()
        .label("position"),
    )
    .where(t.events.c.stream_id == bindparam("stream_id"))
    .order_by(t.events.c.stream_version)
)

#: `_READ_STREAM` as PostgreSQL text, for the driver's own cursor.
_PG_READ_STREAM = (
    "SELECT "
    + ", ".join(f"e.{c.name}" for c in _EVENT_COLUMNS)
    + ", (SELECT l.position FROM event_log l WHERE l.row_id = e.row_id) AS position"
    + " FROM events e WHERE e.stream_id = %s ORDER BY e.stream_version"
)

_READ_WIRE = text(
    """
    SELECT l.position, e.row_id, e.stream_id, e.event_id, e.event_type, e.schema_version, e.body
    FROM event_log l JOIN events e ON e.row_id = l.row_id
    WHERE l.position > :after ORDER BY l.position LIMIT :limit
    """
)
_READ_BODIES = text(
    """
    SELECT l.position, e.stream_id, e.body FROM event_log l JOIN events e ON e.row_id = l.row_id
    WHERE l.position > :after ORDER BY l.position LIMIT :limit
    """
)
#: A shard of the log for a parallel rebuild, filtered by the server: PostgreSQL's own hash of
#: the key (shifted to be non-negative), so a shard gets only its own rows over the wire.
_READ_SHARD_BODIES_PG = text(
    """
    SELECT l.position, e.stream_id, e.body FROM event_log l JOIN events e ON e.row_id = l.row_id
    WHERE l.position > :after AND l.position <= :upto
      AND mod(hashtext(e.stream_id)::bigint + 2147483648, :count) = :index
    ORDER BY l.position
    """
)
_NULL_POSITION = '"position":null'


@contextlib.contextmanager
def _one_backend(conn: Connection) -> Iterator[None]:
    """Read a rebuild's page of the log without parallel workers (PostgreSQL). A page is a few
    thousand index probes, and PostgreSQL plans parallel workers for it that, on the 2-core
    benchmark machine, cost about three times the CPU of one backend (a page of 5,000: 14 ms
    alone, 25 ms in each of three processes): reading the million-event log took 8.4-10.2 s
    of the machine's CPU with them, 5.0-5.2 s without. (The relay's pages of 1,000 are
    planned without workers.) Reads run in autocommit, so SET and RESET."""
    if conn.dialect.name != "postgresql":
        yield
        return
    conn.exec_driver_sql("SET max_parallel_workers_per_gather = 0")
    try:
        yield
    finally:
        conn.exec_driver_sql("RESET max_parallel_workers_per_gather")


def _splice_position(body: str, position: int) -> bytes:
    """Put the position into stored wire bytes. With keys sorted, the envelope's own
    "position" key is the only unescaped `"position":` in the document: data payloads have no
    such key (the schemas say so) and a quote inside a string value is escaped."""
    spliced = body.replace(_NULL_POSITION, f'"position":{position}', 1)
    if spliced == body:
        raise ValueError(f"stored body at position {position} has no null position")
    return spliced.encode("utf-8")


_SQLITE_WRITE_LOCKS: dict[str, threading.Lock] = {}


def _sqlite_write_lock(engine: Engine) -> threading.Lock:
    key = str(engine.url.database)
    return _SQLITE_WRITE_LOCKS.setdefault(key, threading.Lock())


@dataclass(frozen=True, slots=True)
class _Append:
    """One plain append waiting for a group commit."""

    stream_id: str
    expected: int
    events: tuple[PatientEvent, ...]
    #: What is sent per event: on PostgreSQL its wire body (the server takes the columns from
    #: it), on SQLite its column values, ready for the driver.
    rows: list[Any]


class _Failed(Exception):
    """A batch's transaction failed: in a statement (rolled back, nothing written) or in
    COMMIT (`committing`: the outcome is unknown)."""

    def __init__(self, error: DBAPIError, *, committing: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.committing = committing


def _just(request: _Append) -> Callable[[], Sequence[_Append]]:
    return lambda: [request]


def _bind_processor(column_type: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any]:
    process = column_type.dialect_impl(dialect).bind_processor(dialect)
    return process if process is not None else (lambda value: value)


def _pg_batch_params(batch: Sequence[_Append]) -> list[Any]:
    params: list[Any] = []
    for request in batch:
        params += (request.stream_id, request.expected)
    for request in batch:
        params += request.rows
    return params


class SqlEventStore(EventStore):
    def __init__(self, engine: Engine, *, max_in_flight: int = 2, max_batch: int = 32) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(engine)
        # SQLite has one writer at a time anyway: queue this process's writers on a lock
        # rather than on SQLite's busy handler, which sleeps and backs off.
        self._write_queue: AbstractContextManager[Any] = (
            _sqlite_write_lock(engine) if self._sqlite else nullcontext()
        )
        # Concurrent plain appends share transactions (group commit). SQLite runs one at a
        # time anyway; on PostgreSQL, a second batch can run while one is stuck.
        self._group: GroupCommit[_Append, AppendResult] = GroupCommit(
            self._append_batch,
            max_in_flight=1 if self._sqlite else max_in_flight,
            max_batch=max_batch,
        )
        dialect = engine.dialect
        self._to_datetime = _bind_processor(DateTime(timezone=True), dialect)
        self._to_json = _bind_processor(t.Json, dialect)

    # -- writing ----------------------------------------------------------------------------

    def append(
        self,
        stream_id: str,
        expected_version: int,
        events: Sequence[PatientEvent],
        *,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        identity: Identity | None = None,
    ) -> AppendResult:
        if not events:
            raise ValueError("append needs at least one event")
        for offset, event in enumerate(events, start=1):
            if event.stream_id != stream_id or event.stream_version != expected_version + offset:
                raise ValueError(
                    f"event {event.event_id} is for {event.stream_id} v{event.stream_version}; "
                    f"expected {stream_id} v{expected_version + offset}"
                )
        ids = [str(e.event_id) for e in events]
        if len(set(ids)) != len(ids):
            raise Duplicate(
                "an event id appears twice in one append",
                rule="event.duplicate_id",
                field="event_id",
            )
        rows = [self._sqlite_row(e) for e in events] if self._sqlite else map(_body, events)
        request = _Append(stream_id, expected_version, tuple(events), list(rows))
        if idempotency_key is None and identity is None:
            return self._group.submit(stream_id, request)
        try:
            with self._write_queue, self.engine.begin() as conn:
                if idempotency_key is not None:
                    conn.execute(
                        _INSERT_IDEMPOTENCY,
                        {
                            "key": idempotency_key,
                            "request_hash": request_hash,
                            "stream_id": stream_id,
                            "event_ids": ids,
                            "recorded_at": _utc(events[0].recorded_at),
                        },
                    )
                [outcome] = self._write(conn, _just(request))
                if isinstance(outcome, ConcurrencyConflict):
                    raise outcome
                result = outcome
                if identity is not None:
                    conn.execute(
                        insert(t.patient_identities).values(
                            patient_key=stream_id, **identity.model_dump()
                        )
                    )
        except ConcurrencyConflict:
            # A retry of an append that already succeeded finds its stream moved on.
            if idempotency_key is not None:
                prior = self.find_idempotent(idempotency_key, request_hash)
                if prior is not None:
                    return prior
            raise
        except IntegrityError as exc:
            return self._explain_conflict(
                exc, stream_id, expected_version, events, idempotency_key, request_hash, identity
            )
        return result

    def _write(
        self, conn: Connection, take: Callable[[], Sequence[_Append]]
    ) -> list[AppendResult | ConcurrencyConflict]:
        write = self._sqlite_write if self._sqlite else self._pg_append
        return write(conn, take)

    def _sqlite_row(self, event: PatientEvent) -> tuple[Any, ...]:
        """The column values of `event`, converted as SQLAlchemy's column types would."""
        row = _to_row(event)
        row["occurred_at"] = self._to_datetime(row["occurred_at"])
        row["recorded_at"] = self._to_datetime(row["recorded_at"])
        row["data"] = self._to_json(row["data"])
        return tuple(row[c] for c in _COLUMN_NAMES)

    def _sqlite_write(
        self, conn: Connection, take: Callable[[], Sequence[_Append]]
    ) -> list[AppendResult | ConcurrencyConflict]:
        """SQLite: in `conn`'s transaction (BEGIN IMMEDIATE: the writer holds the database's
        write lock, so nothing is ever pending), append a batch and number its events at once,
        on the driver's connection."""
        raw = cast("sqlite3.Connection", conn.connection.driver_connection)
        sql = _SQLITE_TOP
        results: list[AppendResult | ConcurrencyConflict] = []
        try:
            cursor = raw.cursor()
            batch = take()
            top = int(cursor.execute(_SQLITE_TOP).fetchone()[0])
            for request in batch:
                sql = _SQLITE_VERSION
                found = cursor.execute(sql, (request.stream_id,)).fetchone()
                actual = int(found[0]) if found else 0
                if actual != request.expected:
                    results.append(ConcurrencyConflict(request.stream_id, request.expected, actual))
                    continue
                placed = []
                for event, values in zip(request.events, request.rows, strict=True):
                    sql = _SQLITE_INSERT
                    row_id = cursor.execute(sql, values).lastrowid
                    top += 1
                    sql = _SQLITE_LOG
                    cursor.execute(sql, (top, row_id))
                    placed.append(event.model_copy(update={"position": top}))
                results.append(
                    AppendResult(request.stream_id, placed[-1].stream_version, tuple(placed))
                )
        except sqlite3.Error as exc:
            raise self._wrap(exc, sql, False) from exc
        return results

    def _pg_append(
        self, conn: Connection, take: Callable[[], Sequence[_Append]]
    ) -> list[AppendResult | ConcurrencyConflict]:
        """PostgreSQL: in `conn`'s transaction, try the sequencer lock, then `take()` a batch
        (one request per stream) and append it in one statement. Both statements go to the
        driver's connection directly: SQLAlchemy's per-statement work would cost more than
        the statements. A request whose expected version is stale gets its ConcurrencyConflict
        and inserts nothing. A failed statement raises SQLAlchemy's error for it."""
        raw = cast("psycopg.Connection[Any]", conn.connection.driver_connection)
        sql = _PG_TRY_LOCK
        try:
            cursor = raw.cursor()
            row = cursor.execute(_PG_TRY_LOCK).fetchone()
            batch = take()
            if not batch:  # another batch took them all
                return []
            sql = _pg_batch_sql(tuple(len(r.rows) for r in batch), bool(row and row[0]))
            outcomes = cursor.execute(sql, _pg_batch_params(batch)).fetchall()
        except psycopg.Error as exc:
            dead = raw.broken or raw.closed
            if dead:
                conn.invalidate(exc)
            raise self._wrap(exc, sql, dead) from exc
        results: list[AppendResult | ConcurrencyConflict] = []
        for request, (actual, row_ids, positions) in zip(batch, outcomes, strict=True):
            if row_ids is None:
                results.append(ConcurrencyConflict(request.stream_id, request.expected, actual))
            elif positions is None:
                version = request.events[-1].stream_version
                results.append(AppendResult(request.stream_id, version, request.events))
            else:
                placed = tuple(
                    e.model_copy(update={"position": p})
                    for e, p in zip(request.events, positions, strict=True)
                )
                results.append(AppendResult(request.stream_id, placed[-1].stream_version, placed))
        return results

    def _append_batch(
        self, take: Callable[[], Sequence[_Append]]
    ) -> list[AppendResult | BaseException]:
        """Group commit: append a batch of requests in one transaction.

        Each request gets its own outcome. A request whose expected version is stale gets its
        ConcurrencyConflict and writes nothing; the others commit. If a statement fails (a
        unique key taken by another process, a duplicate event id), nothing was written and the
        requests are retried one by one, so that each caller gets its own exact answer."""
        taken: list[Sequence[_Append]] = []

        def take_once() -> Sequence[_Append]:
            if not taken:
                taken.append(take())
            return taken[0]

        try:
            return list(self._transaction(take_once))
        except _Failed as failed:
            was_taken = bool(taken)
            batch = take_once()
            if not was_taken or failed.committing:
                # Connecting failed, or COMMIT did (its outcome is unknown): all share it.
                return [failed.error] * len(batch)
            if len(batch) == 1:
                return [self._explain(batch[0], failed.error)]
            return [self._append_batch(_just(request))[0] for request in batch]

    def _transaction(
        self, take: Callable[[], Sequence[_Append]]
    ) -> list[AppendResult | ConcurrencyConflict]:
        """A batch in a transaction of its own; raises _Failed. A connection found dead before
        COMMIT was sent is replaced, with the rest of the pool, and the batch is tried once
        more (nothing can have committed)."""
        for attempt in (1, 2):
            try:
                with self._write_queue, self.engine.connect() as conn:
                    transaction = conn.begin()
                    try:
                        outcomes = self._write(conn, take)
                    except DBAPIError as exc:
                        if not exc.connection_invalidated:
                            transaction.rollback()
                        raise
                    try:
                        transaction.commit()
                    except DBAPIError as exc:
                        raise _Failed(exc, committing=True) from exc
                    return outcomes
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    # A server restart leaves every pooled connection dead, not just this one.
                    self.engine.dispose(close=False)
                    if attempt == 1:
                        continue
                raise _Failed(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _wrap(self, exc: Exception, sql: str, invalidated: bool) -> DBAPIError:
        """The driver's error as SQLAlchemy's, as if SQLAlchemy had run the statement (the
        callers and the CLI handle those). Parameters are not shown: they hold clinical data."""
        wrapped = DBAPIError.instance(
            sql,
            None,
            exc,
            self.engine.dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=invalidated,
            dialect=self.engine.dialect,
        )
        assert isinstance(wrapped, DBAPIError)
        return wrapped

    def _explain(self, request: _Append, error: BaseException) -> BaseException:
        """A single request's failure as the domain's specific error, where there is one."""
        if not isinstance(error, IntegrityError):
            return error
        try:
            self._explain_conflict(
                error, request.stream_id, request.expected, request.events, None, None, None
            )
        except BaseException as explained:
            return explained
        raise AssertionError("unreachable")  # pragma: no cover

    def _explain_conflict(
        self,
        exc: IntegrityError,
        stream_id: str,
        expected_version: int,
        events: Sequence[PatientEvent],
        idempotency_key: str | None,
        request_hash: str | None,
        identity: Identity | None,
    ) -> AppendResult:
        """Turn a unique-key violation into the domain's specific answer."""
        if idempotency_key is not None:
            prior = self.find_idempotent(idempotency_key, request_hash)
            if prior is not None:
                return prior
        with self._reader() as conn:
            actual = self._stream_version(conn, stream_id)
            if actual != expected_version:
                raise ConcurrencyConflict(stream_id, expected_version, actual) from exc
            ids = [str(e.event_id) for e in events]
            if conn.scalar(select(t.events.c.event_id).where(t.events.c.event_id.in_(ids))):
                raise Duplicate(
                    "an event with one of these event ids is already stored",
                    rule="event.duplicate_id",
                    field="event_id",
                ) from exc
            if identity is not None and identity.mrn is not None:
                owner = conn.scalar(
                    select(t.patient_identities.c.patient_key).where(
                        t.patient_identities.c.mrn == identity.mrn
                    )
                )
                if owner is not None:
                    raise Duplicate(
                        f"MRN is already registered to patient {owner}",
                        rule="identity.duplicate_mrn",
                        field="identity.mrn",
                        patient=owner,
                    ) from exc
        raise exc

    # -- sequencing -------------------------------------------------------------------------

    def sequence(self) -> int:
        """Number every committed pending event; return how many were numbered.

        Only PostgreSQL ever has pending events: a SQLite writer holds the database's write
        lock and numbers its own rows before it commits."""
        if self._sqlite:
            return 0
        with self._reader() as conn:
            if conn.scalar(select(t.event_pending.c.row_id).limit(1)) is None:
                return 0
        with self.engine.begin() as conn:
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_SEQUENCER_KEY})"))
            return len(self._sequence_all(conn))

    def _sequence_all(self, conn: Connection) -> dict[int, int]:
        """Number every pending row this statement can see (the caller holds the lock).

        One statement, run after the lock was taken, so its snapshot includes whatever the
        previous sequencer committed."""
        return {int(r): int(p) for p, r in conn.execute(_PG_SEQUENCE)}

    # -- reading ----------------------------------------------------------------------------

    def read_stream(self, stream_id: str) -> list[PatientEvent]:
        with self._reader() as conn:
            if self._sqlite:
                rows = conn.execute(_READ_STREAM, {"stream_id": stream_id})
                return [_from_row(row) for row in rows]
            # PostgreSQL: every command reads its stream first, so this runs on the driver's
            # connection (as the append does): SQLAlchemy's per-statement work cost more than
            # the statement. Rows come back as dicts, the mapping `_envelope_from_row` reads.
            raw = cast("psycopg.Connection[Any]", conn.connection.driver_connection)
            try:
                with raw.cursor(row_factory=dict_row) as cursor:
                    found = cursor.execute(_PG_READ_STREAM, (stream_id,)).fetchall()
            except psycopg.Error as exc:
                dead = raw.broken or raw.closed
                if dead:
                    conn.invalidate(exc)
                raise self._wrap(exc, _PG_READ_STREAM, dead) from exc
            return [parse_event(_envelope_from_row(row)) for row in found]

    def read_all(self, after: int = 0, limit: int = 1000) -> list[PatientEvent]:
        self.sequence()
        query = (
            select(*_EVENT_COLUMNS, t.event_log.c.position)
            .select_from(t.event_log.join(t.events, t.event_log.c.row_id == t.events.c.row_id))
            .where(t.event_log.c.position > after)
            .order_by(t.event_log.c.position)
            .limit(limit)
        )
        with self._reader() as conn:
            return [_from_row(row) for row in conn.execute(query)]

    def read_wire(self, after: int = 0, limit: int = 1000) -> list[WireEvent]:
        """The relay's and exporter's fast path: the stored bytes, with the position spliced
        in; rows from before revision 0003 are rebuilt from their columns."""
        self.sequence()
        with self._reader() as conn:
            rows = conn.execute(_READ_WIRE, {"after": after, "limit": limit}).all()
            legacy = [row.row_id for row in rows if row.body is None]
            rebuilt: dict[int, WireEvent] = {}
            if legacy:
                query = (
                    select(*_EVENT_COLUMNS, t.event_log.c.position)
                    .select_from(
                        t.event_log.join(t.events, t.event_log.c.row_id == t.events.c.row_id)
                    )
                    .where(t.events.c.row_id.in_(legacy))
                )
                rebuilt = {row.row_id: _wire_from_row(row) for row in conn.execute(query)}
        return [
            rebuilt[row.row_id]
            if row.body is None
            else WireEvent(
                position=row.position,
                stream_id=row.stream_id,
                event_id=row.event_id,
                event_type=row.event_type,
                schema_version=row.schema_version,
                value=_splice_position(row.body, row.position),
            )
            for row in rows
        ]

    def read_bodies(self, after: int = 0, limit: int = 1000) -> list[tuple[int, str, str | bytes]]:
        """(position, stream id, stored wire text with "position": null) in position order,
        without building WireEvents: the projections' rebuild path. Rows from before revision
        0003 come from `read_wire`."""
        rows = self._bodies(_READ_BODIES, {"after": after, "limit": limit})
        if rows is None:
            return [(w.position, w.stream_id, w.value) for w in self.read_wire(after, limit)]
        return rows

    def read_shard_bodies(
        self, after: int, upto: int, index: int, count: int
    ) -> list[tuple[int, str, str | bytes]]:
        """PostgreSQL picks the shard's rows itself (`hashtext` of the key); SQLite filters
        in Python (`shard_of`)."""
        rows = None
        if self.engine.dialect.name == "postgresql":
            params = {"after": after, "upto": upto, "index": index, "count": count}
            rows = self._bodies(_READ_SHARD_BODIES_PG, params)
        if rows is None:  # SQLite, or rows from before revision 0003
            return super().read_shard_bodies(after, upto, index, count)
        return rows

    def _bodies(
        self, statement: Any, params: dict[str, Any]
    ) -> list[tuple[int, str, str | bytes]] | None:
        """(position, stream id, body) rows of a bodies query; None if any row predates the
        stored body (revision 0003), for the caller's slower path."""
        self.sequence()
        rows: list[tuple[int, str, str | bytes]]
        with self._reader() as conn:
            if self._sqlite:
                rows = [
                    (position, stream_id, body)
                    for position, stream_id, body in conn.execute(statement, params)
                ]
            else:
                # psycopg builds the tuples in C: SQLAlchemy's rows cost ~1.5 us each here,
                # on the rebuild's one Python thread.
                raw = cast("psycopg.Connection[Any]", conn.connection.driver_connection)
                sql = _psycopg_params(str(statement))
                with _one_backend(conn):
                    rows = raw.execute(sql, params, prepare=True).fetchall()
        return None if any(body is None for _, _, body in rows) else rows

    def find_idempotent(self, key: str, request_hash: str | None = None) -> AppendResult | None:
        with self._reader() as conn:
            record = conn.execute(
                select(t.idempotency_keys).where(t.idempotency_keys.c.key == key)
            ).first()
            if record is None:
                return None
            if request_hash is not None and record.request_hash not in (None, request_hash):
                raise Duplicate(
                    f"idempotency key {key!r} was already used for a different command",
                    rule="idempotency.key_reused",
                    field="idempotency_key",
                )
            ids = list(record.event_ids)
            rows = conn.execute(
                select(*_EVENT_COLUMNS, t.event_log.c.position)
                .select_from(
                    t.events.outerjoin(t.event_log, t.event_log.c.row_id == t.events.c.row_id)
                )
                .where(t.events.c.event_id.in_(ids))
                .order_by(t.events.c.stream_version)
            ).all()
        events = tuple(_from_row(row) for row in rows)
        return AppendResult(record.stream_id, events[-1].stream_version, events, replayed=True)

    def identity(self, stream_id: str) -> Identity | None:
        with self._reader() as conn:
            row = conn.execute(
                select(
                    t.patient_identities.c.given_name,
                    t.patient_identities.c.family_name,
                    t.patient_identities.c.birth_date,
                    t.patient_identities.c.mrn,
                ).where(t.patient_identities.c.patient_key == stream_id)
            ).first()
        return None if row is None else Identity.model_validate(row._asdict())

    def patient_key_for_mrn(self, mrn: str) -> str | None:
        with self._reader() as conn:
            return conn.scalar(
                select(t.patient_identities.c.patient_key).where(t.patient_identities.c.mrn == mrn)
            )

    def update_identity(self, stream_id: str, identity: Identity) -> None:
        values = identity.model_dump()
        try:
            with self.engine.begin() as conn:
                updated = conn.execute(
                    update(t.patient_identities)
                    .where(t.patient_identities.c.patient_key == stream_id)
                    .values(**values)
                ).rowcount
                if not updated:
                    conn.execute(
                        insert(t.patient_identities).values(patient_key=stream_id, **values)
                    )
        except IntegrityError as exc:
            owner = self.patient_key_for_mrn(identity.mrn or "")
            raise Duplicate(
                f"MRN is already registered to patient {owner}",
                rule="identity.duplicate_mrn",
                field="identity.mrn",
            ) from exc

    def head_position(self) -> int:
        self.sequence()
        with self._reader() as conn:
            return int(conn.scalar(select(func.coalesce(func.max(t.event_log.c.position), 0))) or 0)

    def stream_ids(self) -> list[str]:
        with self._reader() as conn:
            return list(
                conn.execute(select(t.events.c.stream_id).distinct().order_by(t.events.c.stream_id))
                .scalars()
                .all()
            )

    # -- helpers ----------------------------------------------------------------------------

    def _reader(self) -> Connection:
        """A connection for reads. On PostgreSQL it runs in autocommit: each read is one
        statement (one snapshot) over rows that never change, so it needs no transaction, and
        skipping BEGIN and the ROLLBACK on return saves two round trips per read."""
        conn = self.engine.connect()
        if self._sqlite:
            return conn.execution_options(**{BEGIN_MODE: "DEFERRED"})
        return conn.execution_options(isolation_level="AUTOCOMMIT")

    @staticmethod
    def _stream_version(conn: Connection, stream_id: str) -> int:
        version = conn.scalar(
            select(func.max(t.events.c.stream_version)).where(t.events.c.stream_id == stream_id)
        )
        return int(version or 0)


@functools.cache
def _psycopg_params(sql: str) -> Any:
    """A `text()` statement's SQL with psycopg's %(name)s placeholders for its :name ones."""
    return re.sub(r"(?<!:):(\w+)", r"%(\1)s", sql)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC)


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _body(event: PatientEvent) -> str:
    """The canonical wire JSON with "position": null, as stored in `events.body`."""
    body = event.model_dump(mode="json")
    body["position"] = None
    return wire.dumps(body).decode("utf-8")


def _to_row(event: PatientEvent) -> dict[str, Any]:
    body = event.model_dump(mode="json")
    body["position"] = None
    return {
        "event_id": str(event.event_id),
        "stream_id": event.stream_id,
        "stream_version": event.stream_version,
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "occurred_at": _utc(event.occurred_at),
        "recorded_at": _utc(event.recorded_at),
        "actor_id": event.actor.id,
        "actor_role": event.actor.role.value,
        "correlation_id": str(event.correlation_id),
        "causation_id": str(event.causation_id),
        "policy_id": event.policy.id if event.policy else None,
        "policy_version": event.policy.version if event.policy else None,
        "data": body["data"],
        "body": wire.dumps(body).decode("utf-8"),
    }


def _envelope_from_row(m: Any) -> dict[str, Any]:
    policy = (
        {"id": m["policy_id"], "version": m["policy_version"]}
        if m["policy_id"] is not None
        else None
    )
    return {
        "event_id": m["event_id"],
        "event_type": m["event_type"],
        "schema_version": m["schema_version"],
        "stream_id": m["stream_id"],
        "stream_version": m["stream_version"],
        "position": m["position"],
        "occurred_at": _iso(m["occurred_at"]),
        "recorded_at": _iso(m["recorded_at"]),
        "actor": {"id": m["actor_id"], "role": m["actor_role"]},
        "correlation_id": m["correlation_id"],
        "causation_id": m["causation_id"],
        "policy": policy,
        "data": m["data"],
    }


def _iso(value: dt.datetime) -> str:
    """UTC, ISO 8601, 'Z': exactly how pydantic writes an aware UTC datetime."""
    return _as_utc(value).isoformat().replace("+00:00", "Z")


def _wire_from_row(row: Any) -> WireEvent:
    m = row._mapping
    return WireEvent(
        position=m["position"],
        stream_id=m["stream_id"],
        event_id=m["event_id"],
        event_type=m["event_type"],
        schema_version=m["schema_version"],
        value=wire.dumps(_envelope_from_row(m)),
    )


def _from_row(row: Row[Any] | Any) -> PatientEvent:
    return parse_event(_envelope_from_row(row._mapping))


class SqlCheckpoints(Checkpoints):
    """Checkpoints in the event store's own database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def get(self, name: str) -> int:
        query = select(t.checkpoints.c.position).where(t.checkpoints.c.name == name)
        options = {BEGIN_MODE: "DEFERRED"} if is_sqlite(self.engine) else {}
        with self.engine.connect().execution_options(**options) as conn:
            value = conn.scalar(query)
        return int(value or 0)

    def put(self, name: str, position: int) -> None:
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as conn:
            updated = conn.execute(
                update(t.checkpoints)
                .where(t.checkpoints.c.name == name)
                .values(position=position, updated_at=now)
            ).rowcount
            if not updated:
                conn.execute(
                    insert(t.checkpoints).values(name=name, position=position, updated_at=now)
                )
