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

Who sequences: a writer tries the lock *without waiting* (`pg_try_advisory_xact_lock`) at the
end of its own transaction and, if it gets it, numbers everything pending including its own
rows, which then become visible atomically with its commit. A writer that finds the lock taken
just commits. Readers (`read_all`, `sequence`) take the lock *waiting*, so whatever a writer
left pending is numbered before anyone reads by position. Per-patient order holds because a
stream's version k+1 is inserted only after version k committed, so k always gets the lower
position.

SQLite serializes writers itself (every write transaction begins IMMEDIATE), so there the
lock is the database's own and the same code runs unchanged.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

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
from sqlalchemy.exc import IntegrityError

from continuum.adapters.sql import tables as t
from continuum.adapters.sql.database import BEGIN_MODE, is_sqlite
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
_VALUES = ", ".join(f":{name.strip()}" for name in _COLUMNS.split(","))
_TYPED = (
    bindparam("occurred_at", type_=DateTime(timezone=True)),
    bindparam("recorded_at", type_=DateTime(timezone=True)),
    bindparam("data", type_=t.Json),
)
#: The stream's current version from one index entry (a max() aggregate visits every entry).
_LATEST_VERSION = (
    "SELECT stream_version FROM events WHERE stream_id = :stream_id "
    "ORDER BY stream_version DESC LIMIT 1"
)
#: Checks the stream version, inserts the event and its pending row, and tries the sequencer
#: lock, in one round trip. No row comes back when the version guard fails.
_PG_APPEND = text(
    f"""
    WITH guard AS (
        SELECT 1 WHERE coalesce(({_LATEST_VERSION}), 0) = :expected
    ), inserted AS (
        INSERT INTO events ({_COLUMNS}) SELECT {_VALUES} FROM guard RETURNING row_id
    )
    INSERT INTO event_pending (row_id) SELECT row_id FROM inserted
    RETURNING row_id, pg_try_advisory_xact_lock({_SEQUENCER_KEY})
    """
).bindparams(*_TYPED)
#: Drains every visible pending row into the log, numbered after the current maximum.
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
_SQLITE_APPEND = text(
    f"""
    INSERT INTO events ({_COLUMNS})
    SELECT {_VALUES}
    WHERE coalesce(({_LATEST_VERSION}), 0) = :expected
    RETURNING row_id, 1
    """
).bindparams(*_TYPED)
_SQLITE_NUMBER = text(
    "INSERT INTO event_log (position, row_id) "
    "SELECT coalesce(max(position), 0) + 1, :row_id FROM event_log RETURNING position"
)
_INSERT_IDEMPOTENCY = insert(t.idempotency_keys).values(
    key=bindparam("key"),
    request_hash=bindparam("request_hash"),
    stream_id=bindparam("stream_id"),
    event_ids=bindparam("event_ids", type_=JSON),
    recorded_at=bindparam("recorded_at", type_=DateTime(timezone=True)),
)

_READ_WIRE = text(
    """
    SELECT l.position, e.row_id, e.stream_id, e.event_id, e.event_type, e.schema_version, e.body
    FROM event_log l JOIN events e ON e.row_id = l.row_id
    WHERE l.position > :after ORDER BY l.position LIMIT :limit
    """
)
_NULL_POSITION = '"position":null'


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


class SqlEventStore(EventStore):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(engine)
        self._append_sql = _SQLITE_APPEND if self._sqlite else _PG_APPEND
        # SQLite has one writer at a time anyway: queue this process's writers on a lock
        # rather than on SQLite's busy handler, which sleeps and backs off.
        self._write_queue: AbstractContextManager[Any] = (
            _sqlite_write_lock(engine) if self._sqlite else nullcontext()
        )

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
        rows = [_to_row(event) for event in events]
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
                own_rows: list[int] = []
                locked = False
                for offset, row in enumerate(rows):
                    got = conn.execute(
                        self._append_sql, {**row, "expected": expected_version + offset}
                    ).first()
                    if got is None:  # the guard saw another version: nothing was inserted
                        actual = self._stream_version(conn, stream_id)
                        raise ConcurrencyConflict(stream_id, expected_version, actual)
                    own_rows.append(int(got[0]))
                    locked = bool(got[1])
                if identity is not None:
                    conn.execute(
                        insert(t.patient_identities).values(
                            patient_key=stream_id, **identity.model_dump()
                        )
                    )
                if self._sqlite:
                    numbered = self._number_directly(conn, own_rows)
                else:
                    numbered = self._sequence_all(conn) if locked else {}
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
        placed = tuple(
            e.model_copy(update={"position": numbered[r]}) if r in numbered else e
            for e, r in zip(events, own_rows, strict=True)
        )
        return AppendResult(stream_id, events[-1].stream_version, placed)

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

    def _number_directly(self, conn: Connection, own_rows: list[int]) -> dict[int, int]:
        """SQLite: the writer holds the database's write lock, so no event can be pending and
        it numbers its own rows at once."""
        numbered = {}
        for row_id in own_rows:
            numbered[row_id] = int(conn.execute(_SQLITE_NUMBER, {"row_id": row_id}).scalar_one())
        return numbered

    # -- reading ----------------------------------------------------------------------------

    def read_stream(self, stream_id: str) -> list[PatientEvent]:
        query = (
            select(*_EVENT_COLUMNS, t.event_log.c.position)
            .select_from(t.events.outerjoin(t.event_log, t.event_log.c.row_id == t.events.c.row_id))
            .where(t.events.c.stream_id == stream_id)
            .order_by(t.events.c.stream_version)
        )
        with self._reader() as conn:
            return [_from_row(row) for row in conn.execute(query)]

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
        conn = self.engine.connect()
        if self._sqlite:
            conn = conn.execution_options(**{BEGIN_MODE: "DEFERRED"})
        return conn

    @staticmethod
    def _stream_version(conn: Connection, stream_id: str) -> int:
        version = conn.scalar(
            select(func.max(t.events.c.stream_version)).where(t.events.c.stream_id == stream_id)
        )
        return int(version or 0)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC)


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


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
