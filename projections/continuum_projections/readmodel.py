"""The read-model tables and their writer.

Read models are disposable: they are rebuilt from the log (`continuum replay`), so their tables
are created by `ReadModel.create()` rather than by the event store's migrations, and a schema
change bumps `SCHEMA_VERSION`, which asks for a rebuild. They may live in the event store's
database (the default) or in any other (`--into URL`).

`ReadModel.flush` writes one batch of row changes, the touched patients' fold state and the
runner's checkpoints in ONE transaction: a crash at any point leaves either the whole batch or
none of it, so a restarted runner neither loses nor double-counts an event.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import logging
import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.schema import CreateTable
from sqlalchemy.types import TypeEngine

from continuum.domain.errors import StoreNotReady
from continuum_projections.fold import COLUMNS, Changes, PatientFold, Row

log = logging.getLogger("continuum.projections")

SCHEMA_VERSION = "1"
#: A census snapshot is cut after this many census deltas (bounds an as-of query's replay).
SNAPSHOT_EVERY = 2_000

metadata = MetaData()


def _ident(length: int) -> TypeEngine[str]:
    """An identifier column (an event's, a stay's, an episode's id; a patient key): on
    PostgreSQL compared byte by byte (`COLLATE "C"`; the same order for these ASCII values).
    The database's default collation (C.UTF-8 here) compares through the C library, and sorts
    without abbreviated keys: building the index on the transitions' patient keys after a
    million-event rebuild took 471 ms with it, 260 ms with "C" (inserting the rows took the
    same time either way)."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


meta = Table(
    "rm_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

#: In `meta` while the census snapshots are deferred (`ReadModel.defer_snapshots`).
DEFERRED_SNAPSHOTS = "snapshots"

#: The checkpoint of the store runner: the last log position applied.
STORE_CHECKPOINT = "store"


def state_checkpoint(name: str) -> str:
    """The checkpoint up to which every patient's saved fold state is complete, beside a
    deferring runner's checkpoint `name` (see `ContinuumFold.take`). Between the two, rows
    are written but the state of patients in care is not: a restarted runner folds that
    stretch again without writing."""
    return f"{name}:state"


checkpoints = Table(
    "rm_checkpoints",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

patients = Table(
    "rm_patients",
    metadata,
    Column("patient_key", _ident(64), primary_key=True),
    Column("state", String(24), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("level", String(24)),
    Column("site", String(64)),
    Column("program", String(64)),
    Column("age_group", String(16)),
    Column("episode_id", _ident(36)),
    Column("placed_at", DateTime(timezone=True)),
    Column("last_assessed_at", DateTime(timezone=True)),
    Column("version", Integer, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("fold_state", Text, nullable=False),
    Index("ix_rm_patients_active_level", "active", "level"),
)

stays = Table(
    "rm_stays",
    metadata,
    Column("stay_id", _ident(36), primary_key=True),
    Column("patient_key", _ident(64), nullable=False, index=True),
    Column("episode_id", _ident(36), nullable=False),
    Column("level", String(24), nullable=False),
    Column("site", String(64), nullable=False),
    Column("program", String(64)),
    Column("age_group", String(16), nullable=False),
    Column("start_kind", String(16), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("started_recorded_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), index=True),
    Column("ended_recorded_at", DateTime(timezone=True)),
    Column("end_event_id", _ident(36)),
    Column("end_kind", String(16)),
    Column("next_level", String(24)),
    Column("voided", Boolean, nullable=False),
    # "Who was in care at T" reads only this index (PostgreSQL: an index-only scan).
    Index(
        "ix_rm_stays_started_at",
        "started_at",
        postgresql_include=["ended_at", "level", "site", "program", "age_group", "voided"],
    ),
)

episodes = Table(
    "rm_episodes",
    metadata,
    Column("episode_id", _ident(36), primary_key=True),
    Column("patient_key", _ident(64), nullable=False, index=True),
    Column("episode_number", Integer, nullable=False),
    Column("age_group", String(16), nullable=False),
    Column("admitted_at", DateTime(timezone=True), nullable=False),
    Column("admitted_recorded_at", DateTime(timezone=True), nullable=False),
    Column("admission_event_id", _ident(36), nullable=False),
    Column("entry_level", String(24), nullable=False),
    Column("entry_site", String(64), nullable=False),
    Column("previous_episode_id", _ident(36)),
    Column("days_since_previous_discharge", Float),
    Column("policy_id", String(32)),
    Column("policy_version", String(32)),
    Column("discharged_at", DateTime(timezone=True), index=True),
    Column("discharge_event_id", _ident(36)),
    Column("discharge_level", String(24)),
    Column("discharge_reason", String(24)),
    Column("discharge_disposition", String(16)),
    Column("readmitted_at", DateTime(timezone=True)),
    Column("readmission_episode_id", _ident(36)),
    Column("readmitted_within_30d", Boolean, nullable=False),
    Column("voided", Boolean, nullable=False),
)

transitions = Table(
    "rm_transitions",
    metadata,
    Column("event_id", _ident(36), primary_key=True),
    Column("patient_key", _ident(64), nullable=False, index=True),
    Column("episode_id", _ident(36), nullable=False),
    Column("position", BigInteger),
    Column("kind", String(16), nullable=False),
    Column("direction", String(16), nullable=False),
    Column("from_level", String(24)),
    Column("from_site", String(64)),
    Column("to_level", String(24), nullable=False),
    Column("to_site", String(64), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False, index=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("reassessment_event_id", _ident(36), nullable=False),
    Column("reassessment_at", DateTime(timezone=True), nullable=False),
    Column("reassessment_age_days", Float, nullable=False),
    Column("ratings", Text, nullable=False),
    Column("hours_scheduled", Float),
    Column("indicated_level", String(24), nullable=False),
    Column("variance_reason", String(32)),
    Column("authorization_ref", String(64)),
    Column("actor_id", String(64), nullable=False),
    Column("actor_role", String(32), nullable=False),
    Column("policy_id", String(32)),
    Column("policy_version", String(32)),
    Column("window_days", Integer),
    Column("flag_stale_reassessment", Boolean, nullable=False),
    Column("flag_level_differs", Boolean, nullable=False),
    Column("skipped_levels", String(200)),
    Column("flag_skipped_levels", Boolean, nullable=False),
    Column("hours_band_min", Float),
    Column("hours_attended_14d", Float),
    Column("hours_per_week_attended", Float),
    Column("flag_hours_below_band", Boolean, nullable=False),
    Column("days_since_discharge", Float),
    Column("flag_readmission_30d", Boolean, nullable=False),
    Column("voided", Boolean, nullable=False),
    Column("voided_by", _ident(36)),
    Column("voided_at", DateTime(timezone=True)),
)

#: Append-only, read by range of recorded time and summed: no key of its own. (Read models
#: made before had a surrogate `delta_id` here, a sequence and a primary key that nothing read:
#: 0.7 s of the server's time per million events. The writer names its columns, so such a
#: read model is still written, the old column filled by its default.)
census_deltas = Table(
    "rm_census_deltas",
    metadata,
    Column("event_id", String(36), nullable=False),
    Column("position", BigInteger),
    Column("recorded_at", DateTime(timezone=True), nullable=False, index=True),
    Column("level", String(24), nullable=False),
    Column("site", String(64), nullable=False),
    Column("program", String(64), nullable=False),
    Column("age_group", String(16), nullable=False),
    Column("delta", Integer, nullable=False),
)

census_snapshots = Table(
    "rm_census_snapshots",
    metadata,
    Column("boundary", DateTime(timezone=True), primary_key=True),
    Column("level", String(24), primary_key=True),
    Column("site", String(64), primary_key=True),
    Column("program", String(64), primary_key=True),
    Column("age_group", String(16), primary_key=True),
    Column("count", Integer, nullable=False),
)

census_boundaries = Table(
    "rm_census_boundaries",
    metadata,
    Column("boundary", DateTime(timezone=True), primary_key=True),
    Column("deltas", BigInteger, nullable=False),
)

#: Indexes only queries use: built after a rebuild rather than maintained during it.
DEFERRED_INDEXES = frozenset(
    index.name
    for table in (patients, stays, episodes, transitions)
    for index in table.indexes
    if index.name is not None
)

#: Indexes only the census snapshots' upkeep uses. A rebuild keeps no snapshots as it goes (a
#: parallel rebuild's merge, or the end of a one-process rebuild's run, cuts them all), so the
#: index is dropped meanwhile (`shed_upkeep_indexes`) and `finish()` builds it with the
#: others: sorting 614,000 deltas once is cheaper than inserting each into the index.
UPKEEP_INDEXES = frozenset(index.name for index in census_deltas.indexes if index.name is not None)

ROW_TABLES: dict[str, Table] = {"stays": stays, "episodes": episodes, "transitions": transitions}
KEYS: dict[str, str] = {"stays": "stay_id", "episodes": "episode_id", "transitions": "event_id"}
CENSUS_KEY = ("level", "site", "program", "age_group")


@dataclass(frozen=True)
class Batch:
    """Row changes and patient rows ready to write (see `ReadModel.prepare`)."""

    changes: Changes
    new_patients: list[Row]
    old_patients: list[Row]


class ReadModelError(StoreNotReady):
    """The read model cannot be used as it is (wrong schema version, another source)."""

    rule = "read_model.not_ready"


def _time(value: str | dt.datetime) -> dt.datetime:
    """A row's time (the events' ISO 8601 strings, or datetimes) as an aware datetime."""
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    aware = utc(value)
    assert aware is not None
    return aware


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Datetimes come back naive from SQLite; everything stored is UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class ReadModel:
    """The read-model tables in one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- schema -------------------------------------------------------------------------------

    def create(self) -> None:
        """Create the tables if missing; refuse a read model of another schema version.

        A new read model gets only the indexes its writer needs; the query indexes
        (`DEFERRED_INDEXES`) are built by `finish()` once the first run has caught up, which
        is several times cheaper than maintaining them row by row during a rebuild."""
        from sqlalchemy import inspect

        # Several workers may start on a new read model at once: look and create under one
        # lock (SQLite: the BEGIN IMMEDIATE write lock; PostgreSQL: an advisory lock).
        with self.engine.begin() as conn:
            _serialize(conn, SCHEMA_LOCK)
            present = set(inspect(conn).get_table_names())
            for table in metadata.sorted_tables:
                if table.name in present:
                    continue
                conn.execute(CreateTable(table))
                if table is patients and conn.dialect.name == "postgresql":
                    _compress_fold_state(conn)
                for index in table.indexes:
                    if index.name not in DEFERRED_INDEXES:
                        index.create(conn)
            found = conn.execute(select(meta.c.value).where(meta.c.key == "schema")).scalar()
            if found is None:
                conn.execute(insert(meta).values(key="schema", value=SCHEMA_VERSION))
            elif found != SCHEMA_VERSION:
                raise ReadModelError(
                    f"the read model in this database is schema version {found}; this code "
                    f"writes version {SCHEMA_VERSION}. Rebuild it: continuum replay --reset"
                )

    def finish(self, alongside: Callable[[], object] | None = None) -> None:
        """Build any query index not built yet (after a rebuild has caught up).

        On PostgreSQL each table then gets a VACUUM (ANALYZE): statistics for the planner and
        a visibility map, so that the covering indexes answer without visiting the tables. Two
        connections share that work (on the million-event benchmark, 2.9 s on one). A parallel
        rebuild's merge, or a rebuild's deferred snapshots (`cut_deferred_snapshots`), runs as
        `alongside`, in this thread, meanwhile: the tables it writes (the census snapshots)
        are vacuumed after it. `alongside` runs whether or not there is anything to build."""
        missing = self._missing_indexes()
        if not missing or self.engine.dialect.name != "postgresql":
            if missing:
                with self.engine.begin() as conn:
                    for index in missing:
                        index.create(conn)
            if alongside is not None:
                alongside()
            return
        later = {census_snapshots.name, census_boundaries.name, meta.name, checkpoints.name}
        first = [t for t in metadata.sorted_tables if t.name not in later]
        # Those with the most indexes to build first, so that neither connection is left
        # with a long one at the end.
        first.sort(key=lambda t: -len([i for i in missing if i.table is t]))
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="read-model-finish") as pool:
            done = [pool.submit(self._finish_table, t, missing) for t in first]
            try:
                if alongside is not None:
                    alongside()
            finally:
                done += [
                    pool.submit(self._finish_table, t, missing)
                    for t in metadata.sorted_tables
                    if t.name in later
                ]
                for future in done:
                    future.result()

    def shed_upkeep_indexes(self) -> None:
        """Drop the indexes only the census snapshots' upkeep uses (`UPKEEP_INDEXES`), for
        writers that keep no snapshots: a parallel rebuild's shards, and a rebuild from the
        start (`defer_snapshots`). `finish()` builds them again."""
        with self.engine.begin() as conn:
            for name in sorted(UPKEEP_INDEXES):
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")

    # -- census snapshots cut at the end of a rebuild ------------------------------------------

    def defer_snapshots(self) -> None:
        """Keep no census snapshots batch by batch: a rebuild from the start cuts them all at
        the end of its run instead (`cut_deferred_snapshots`, as a parallel rebuild's merge
        does), and the index only their upkeep reads is built then (`finish`). Recorded in the
        read model, so that a runner stopped or killed half-way goes on the same way. Until
        they are cut the census is still exact: a query sums the deltas from the start."""
        with self.engine.begin() as conn:
            _serialize(conn, SNAPSHOT_LOCK)
            if not _snapshots_deferred(conn):
                conn.execute(insert(meta).values(key=DEFERRED_SNAPSHOTS, value="deferred"))
        self.shed_upkeep_indexes()

    def snapshots_deferred(self) -> bool:
        with self.engine.connect() as conn:
            return _snapshots_deferred(conn)

    def cut_deferred_snapshots(self) -> None:
        """Cut every census snapshot if they were deferred (`defer_snapshots`); from then on
        the writer keeps them batch by batch."""
        with self.engine.begin() as conn:
            _serialize(conn, SNAPSHOT_LOCK)
            if conn.execute(delete(meta).where(meta.c.key == DEFERRED_SNAPSHOTS)).rowcount:
                _cut_all_snapshots(conn)

    def _missing_indexes(self) -> list[Index]:
        from sqlalchemy import inspect

        inspector = inspect(self.engine)
        return [
            index
            for table in metadata.sorted_tables
            for index in table.indexes
            if (index.name in DEFERRED_INDEXES or index.name in UPKEEP_INDEXES)
            and index.name not in {i["name"] for i in inspector.get_indexes(table.name)}
        ]

    def _finish_table(self, table: Table, missing: list[Index]) -> None:
        """Build the table's missing query indexes, then VACUUM (ANALYZE) it (PostgreSQL)."""
        indexes = [index for index in missing if index.table is table]
        if indexes:
            with self.engine.begin() as conn:
                for index in indexes:
                    index.create(conn)
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table.name}")

    def claim(self, source: str) -> None:
        """Record which source feeds this read model; refuse a second, different one (two
        sources would count every event twice)."""
        with self.engine.begin() as conn:
            _serialize(conn, SCHEMA_LOCK)
            found = conn.execute(select(meta.c.value).where(meta.c.key == "source")).scalar()
            if found is None:
                conn.execute(insert(meta).values(key="source", value=source))
            elif found != source:
                raise ReadModelError(
                    f"this read model is fed by {found}; it cannot also be fed by {source}. "
                    "Use another database (--into URL) or rebuild it (continuum replay --reset)",
                    source=found,
                )

    def source(self) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == "source")).scalar()
        return str(value) if value is not None else None

    def reset(self) -> None:
        """Drop and recreate every read-model table (the log itself is untouched)."""
        metadata.drop_all(self.engine)
        self.create()

    def exists(self) -> bool:
        from sqlalchemy import inspect

        return inspect(self.engine).has_table(meta.name)

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint(self, name: str) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(checkpoints.c.position).where(checkpoints.c.name == name)
            ).scalar()
        return int(value or 0)

    def merge_checkpoints(
        self, parts: Sequence[str], into: str, *, position: int, source: tuple[str, str]
    ) -> None:
        """End a parallel rebuild, in one transaction: every part's checkpoint, and the state
        checkpoint beside it, must stand at `position`; they become the one checkpoint `into`
        (and its state checkpoint), and the read model's source `source[0]` becomes
        `source[1]` (so that the ordinary runner goes on from there)."""
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as conn:
            _serialize(conn, SCHEMA_LOCK)
            found = conn.execute(select(meta.c.value).where(meta.c.key == "source")).scalar()
            if found != source[0]:
                raise ReadModelError(
                    f"this read model is fed by {found}, not by {source[0]}: nothing to merge",
                    source=found,
                )
            every = [*parts, *(state_checkpoint(name) for name in parts)]
            saved = dict(
                conn.execute(
                    select(checkpoints.c.name, checkpoints.c.position)
                    .where(checkpoints.c.name.in_(every))
                    .with_for_update()
                ).all()
            )
            behind = {name: int(saved.get(name) or 0) for name in every}
            behind = {name: at for name, at in behind.items() if at != position}
            if behind:
                listed = ", ".join(f"{name} at {at}" for name, at in sorted(behind.items()))
                raise ReadModelError(
                    f"cannot merge the shards' checkpoints: {listed}, not {position}. Run the "
                    "same parallel rebuild again: each shard goes on from its checkpoint"
                )
            conn.execute(delete(checkpoints).where(checkpoints.c.name.in_(every)))
            _put_checkpoint(conn, into, position, now, None)
            _put_checkpoint(conn, state_checkpoint(into), position, now, None)
            conn.execute(update(meta).where(meta.c.key == "source").values(value=source[1]))
            _cut_all_snapshots(conn)

    def checkpoints_like(self, prefix: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(checkpoints.c.name, checkpoints.c.position).where(
                    checkpoints.c.name.startswith(prefix)
                )
            ).all()
        return {name: int(position) for name, position in rows}

    # -- fold state ---------------------------------------------------------------------------

    def load_patients(self, keys: Iterable[str]) -> dict[str, PatientFold]:
        return {
            key: PatientFold.from_json(key, state)
            for key, state in self._patient_column(patients.c.fold_state, keys)
        }

    def saved_versions(self, keys: Iterable[str]) -> dict[str, int]:
        """The version of each of these patients' saved fold state (absent: none saved)."""
        return {
            key: int(version) for key, version in self._patient_column(patients.c.version, keys)
        }

    def _patient_column(self, column: Any, keys: Iterable[str]) -> list[tuple[str, Any]]:
        """(patient key, value of `column`) for each of these patients that has a row."""
        keys = list(keys)
        found: list[tuple[str, Any]] = []
        with self.engine.connect() as conn:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                query = select(patients.c.patient_key, column).where(
                    patients.c.patient_key.in_(chunk)
                )
                found.extend((row[0], row[1]) for row in conn.execute(query))
        return found

    # -- the writer ---------------------------------------------------------------------------

    def flush(
        self, changes: Changes, touched: list[PatientFold], positions: Mapping[str, int]
    ) -> None:
        """Write a batch and the runner's checkpoints in one transaction."""
        self.write(self.prepare(changes, touched), positions)

    def prepare(self, changes: Changes, touched: list[PatientFold]) -> Batch:
        """Freeze a batch for writing (the fold may go on changing its patients meanwhile).
        The patients count as stored from here: if the write fails, the runner drops its
        cache and starts again from the saved checkpoint."""
        new = [p.row() for p in touched if not p.stored]
        old = [p.row() for p in touched if p.stored]
        for p in touched:
            p.stored = True
        return Batch(changes=changes, new_patients=new, old_patients=old)

    def write(
        self,
        batch: Batch,
        positions: Mapping[str, int],
        starts: Mapping[str, int] | None = None,
        *,
        snapshots: bool = True,
    ) -> None:
        """One transaction: rows, patients' fold state, census deltas, checkpoints; and the
        census snapshots' upkeep, unless `snapshots` is False (the shards of a parallel
        rebuild: `merge_checkpoints` cuts every snapshot once they are done).

        `starts` fences a writer that lost its partitions: for each checkpoint named there,
        the batch began at that offset, so the saved checkpoint must not be past it. If it
        is, another worker has projected those events since (this one stalled past its
        session and the group gave its partitions away): `StaleBatch`, and nothing of the
        batch is written."""
        now = dt.datetime.now(dt.UTC)
        changes = batch.changes
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # A read model is rebuilt from the log, and its checkpoint commits with its
                # rows: if the server crashes before this commit reaches disk, rows and
                # checkpoint are lost together and the runner applies the batch again. So
                # the commit need not wait for the WAL flush (nor hold the snapshot lock
                # through it).
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            if starts:
                _fence(conn, starts)  # before any row: a stale batch writes nothing
            for name, table in ROW_TABLES.items():
                inserted = changes.inserts.get(name)
                if inserted:
                    _write_values(conn, table, COLUMNS[name], inserted.values())
                for fields, keyed in _group_patches(changes.patches.get(name, {})).items():
                    _update(conn, table, KEYS[name], fields, keyed)
            _write(conn, patients, batch.new_patients)
            if batch.old_patients:
                fields = tuple(c.name for c in patients.c if c.name != "patient_key")
                params = [
                    {"_key": row["patient_key"], **{f"v_{f}": row[f] for f in fields}}
                    for row in batch.old_patients
                ]
                _update(conn, patients, "patient_key", fields, params)
            if changes.deltas:
                _write(conn, census_deltas, changes.deltas)
                if snapshots:
                    self._maintain_snapshots(conn, changes.deltas)
            for name, position in positions.items():
                start = starts.get(name) if starts is not None else None
                _put_checkpoint(conn, name, position, now, start)

    # -- census snapshots ---------------------------------------------------------------------

    def _maintain_snapshots(self, conn: Connection, deltas: list[Row]) -> None:
        """Keep every snapshot equal to the sum of the deltas recorded at or before it.

        A delta recorded at or before an existing boundary (clocks of concurrent writers, or
        the Kafka runner's partitions, interleave) is added to every snapshot at or after it.
        A new snapshot is cut after SNAPSHOT_EVERY deltas.

        Several Kafka runners (one consumer group) may write one read model, so the snapshot
        bookkeeping is read again under a lock in every transaction: a boundary another
        worker cut since this one's last flush must get this batch's earlier deltas too.
        """
        _serialize(conn, SNAPSHOT_LOCK)
        times = [_time(d["recorded_at"]) for d in deltas]
        last = utc(conn.execute(select(func.max(census_boundaries.c.boundary))).scalar())
        after_last = select(func.count()).select_from(census_deltas)
        if last is not None:
            after_last = after_last.where(census_deltas.c.recorded_at > last)
        fresh = sorted(t for t in times if last is None or t > last)
        # Deltas after the last boundary, not counting this batch's (already inserted).
        pending = int(conn.execute(after_last).scalar() or 0) - len(fresh)
        if last is not None:
            late = [(t, d) for d, t in zip(deltas, times, strict=True) if t <= last]
            if late:
                _add_to_snapshots(conn, late)
        per_instant = ((t, len(list(same))) for t, same in itertools.groupby(fresh))
        for boundary, since in _snapshot_cuts(per_instant, since=pending):
            self._cut_snapshot(conn, boundary, last, since)
            last = boundary

    def _cut_snapshot(
        self, conn: Connection, boundary: dt.datetime, previous: dt.datetime | None, deltas: int
    ) -> None:
        counts = census_totals(conn, boundary, previous)
        _write(conn, census_snapshots, _snapshot_rows(boundary, counts))
        conn.execute(insert(census_boundaries).values(boundary=boundary, deltas=deltas))


def _snapshot_rows(
    boundary: dt.datetime, counts: Mapping[tuple[str, str, str, str], int]
) -> list[Row]:
    """The census snapshot at `boundary`: a row per census key with a count."""
    return [
        {"boundary": boundary, **dict(zip(CENSUS_KEY, key, strict=True)), "count": n}
        for key, n in counts.items()
        if n
    ]


def _snapshots_deferred(conn: Connection) -> bool:
    found = conn.execute(select(meta.c.key).where(meta.c.key == DEFERRED_SNAPSHOTS)).first()
    return found is not None


def _cut_all_snapshots(conn: Connection) -> None:
    """Cut the census snapshots of a read model whose deltas were written without them (a
    rebuild: a parallel one's shards, or a store runner's first run), where `_snapshot_cuts`
    says, as `_maintain_snapshots` cuts them as batches come. Any snapshots there are
    replaced.

    PostgreSQL sums the deltas between boundaries itself (`_cut_in_sql`): on the
    million-event benchmark's 614,000 deltas that took 0.7-1.0 s, against 1.8-2.1 s for
    streaming them through Python."""
    conn.execute(delete(census_snapshots))
    conn.execute(delete(census_boundaries))
    if conn.dialect.name == "postgresql":
        snapshot_rows, boundary_rows = _cut_in_sql(conn)
    else:
        snapshot_rows, boundary_rows = _cut_in_python(conn)
    _write(conn, census_snapshots, snapshot_rows)
    _write(conn, census_boundaries, boundary_rows)


def _cut_in_python(conn: Connection) -> tuple[list[Row], list[Row]]:
    """One pass over the deltas in recorded order, adding up the census as it goes."""
    key_cols = [census_deltas.c[k] for k in CENSUS_KEY]
    query = select(census_deltas.c.recorded_at, *key_cols, census_deltas.c.delta).order_by(
        census_deltas.c.recorded_at
    )
    totals: dict[tuple[str, str, str, str], int] = {}
    rows: Any = conn.execution_options(stream_results=True, yield_per=20_000).execute(query)

    def per_instant() -> Iterator[tuple[dt.datetime, int]]:
        """Adds each instant's deltas to `totals` before handing on their count."""
        for stored, deltas in itertools.groupby(rows, key=operator.itemgetter(0)):
            n = 0
            for _, level, site, program, age_group, delta in deltas:
                key = (level, site, program, age_group)
                totals[key] = totals.get(key, 0) + int(delta)
                n += 1
            yield _time(stored), n

    snapshot_rows: list[Row] = []
    boundary_rows: list[Row] = []
    for boundary, since in _snapshot_cuts(per_instant()):
        snapshot_rows.extend(_snapshot_rows(boundary, totals))
        boundary_rows.append({"boundary": boundary, "deltas": since})
    return snapshot_rows, boundary_rows


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_Instant = TypeVar("_Instant")


def _snapshot_cuts(
    per_instant: Iterable[tuple[_Instant, int]], since: int = 0
) -> Iterator[tuple[_Instant, int]]:
    """The one rule for where census snapshots are cut, wherever they are cut (as batches come,
    `_maintain_snapshots`; all at once, `_cut_in_python` and `_cut_in_sql`): a snapshot is cut
    as soon as SNAPSHOT_EVERY deltas have come since the last, after the last delta of an
    instant (deltas recorded at the same instant go together).

    Of (instant, deltas recorded at it) in recorded order, yields the instants that end a
    snapshot, each with the number of deltas since the one before (`since` of them came
    before the first instant). Lazy: when it yields an instant, it has taken nothing after it
    from `per_instant`."""
    for instant, n in per_instant:
        since += n
        if since >= SNAPSHOT_EVERY:
            yield instant, since
            since = 0


def _cut_in_sql(conn: Connection) -> tuple[list[Row], list[Row]]:
    """The same snapshots as `_cut_in_python`: the boundaries from the count of deltas per
    instant, then the server sums the deltas per census key between consecutive boundaries
    (`width_bucket` finds a delta's boundary in the sorted array) and Python adds those sums
    up boundary by boundary."""
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor:  # type: ignore[union-attr]
        # Each instant as whole microseconds since the epoch: integers cost next to nothing
        # to read, where making datetimes of the benchmark's 383,000 instants took 0.4 s
        # (and reading the counts alone, then the boundaries' instants by their ordinals in
        # a second query, sorted the deltas twice).
        cursor.execute(
            "SELECT CAST(extract(epoch FROM recorded_at) * 1000000 AS bigint), count(*)"
            f" FROM {census_deltas.name} GROUP BY recorded_at ORDER BY recorded_at"
        )
        per_instant: list[tuple[int, int]] = cursor.fetchall()
    cuts = list(_snapshot_cuts(per_instant))
    if not cuts:
        return [], []
    boundary_rows: list[Row] = [
        {"boundary": _EPOCH + dt.timedelta(microseconds=at), "deltas": n} for at, n in cuts
    ]
    bounds = [row["boundary"] for row in boundary_rows]
    # A delta belongs to the first boundary at or after its time: `width_bucket` counts the
    # boundaries at or before it, one too many if it falls on a boundary.
    sums = conn.execute(
        text(
            "SELECT CASE WHEN w > 0 AND recorded_at = (CAST(:bounds AS timestamptz[]))[w]"
            " THEN w ELSE w + 1 END AS bucket, level, site, program, age_group, sum(delta)"
            " FROM (SELECT width_bucket(recorded_at, CAST(:bounds AS timestamptz[])) AS w,"
            f" recorded_at, level, site, program, age_group, delta FROM {census_deltas.name})"
            " AS d WHERE w < :count OR (w = :count AND recorded_at = :last)"
            " GROUP BY 1, 2, 3, 4, 5 ORDER BY 1"
        ),
        {"bounds": bounds, "count": len(bounds), "last": bounds[-1]},
    )
    by_bucket: dict[int, list[tuple[tuple[str, str, str, str], int]]] = {}
    for bucket, level, site, program, age_group, total in sums:
        by_bucket.setdefault(int(bucket), []).append(
            ((level, site, program, age_group), int(total))
        )
    totals: dict[tuple[str, str, str, str], int] = {}
    snapshot_rows: list[Row] = []
    for number, boundary in enumerate(bounds, start=1):
        for key, n in by_bucket.get(number, []):
            totals[key] = totals.get(key, 0) + n
        snapshot_rows.extend(_snapshot_rows(boundary, totals))
    return snapshot_rows, boundary_rows


#: PostgreSQL advisory-lock keys (transaction scope) for writers sharing one read model.
SCHEMA_LOCK = 0x636F6E74_0001
SNAPSHOT_LOCK = 0x636F6E74_0002


def _compress_fold_state(conn: Connection) -> None:
    """Compress the patients' fold state (about 2 KB of JSON a row, so PostgreSQL compresses
    it out of line) with LZ4 where the server has it: its default, pglz, took 2.5-3.0 s of
    the server's time to COPY the 67,000 patients of a million-event rebuild, LZ4 1.7 s."""
    offered = conn.exec_driver_sql(
        "SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'"
    ).scalar()
    method = toast_compression(offered)
    if method is not None:
        conn.exec_driver_sql(
            f"ALTER TABLE {patients.name} ALTER COLUMN fold_state SET COMPRESSION {method}"
        )


def toast_compression(offered: Sequence[str] | None) -> str | None:
    """LZ4 if the server offers it (PostgreSQL 14 or later, built with it), else None (keep
    the server's default)."""
    return "lz4" if offered is not None and "lz4" in offered else None


def _serialize(conn: Connection, key: int) -> None:
    """Hold `key` until this transaction ends. PostgreSQL only: a SQLite write transaction
    (BEGIN IMMEDIATE, see adapters/sql/database.py) already holds the database's one write
    lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def census_totals(
    conn: Connection, as_of: dt.datetime | None, snapshot: dt.datetime | None = None
) -> dict[tuple[str, str, str, str], int]:
    """Counts per census key from the snapshot at `snapshot` plus deltas up to `as_of` (all
    of them when `as_of` is None)."""
    totals: dict[tuple[str, str, str, str], int] = {}
    if snapshot is not None:
        for row in conn.execute(
            select(*[census_snapshots.c[k] for k in CENSUS_KEY], census_snapshots.c.count).where(
                census_snapshots.c.boundary == snapshot
            )
        ):
            totals[(row[0], row[1], row[2], row[3])] = int(row[4])
    key_cols = [census_deltas.c[k] for k in CENSUS_KEY]
    query = select(*key_cols, func.sum(census_deltas.c.delta))
    if as_of is not None:
        query = query.where(census_deltas.c.recorded_at <= as_of)
    if snapshot is not None:
        query = query.where(census_deltas.c.recorded_at > snapshot)
    for row in conn.execute(query.group_by(*key_cols)):
        key = (row[0], row[1], row[2], row[3])
        totals[key] = totals.get(key, 0) + int(row[4])
    return totals


def census_as_of(conn: Connection, as_of: dt.datetime) -> dict[tuple[str, str, str, str], int]:
    """The census as the log stood at recorded time `as_of`: nearest snapshot plus deltas."""
    snapshot = utc(
        conn.execute(
            select(func.max(census_boundaries.c.boundary)).where(
                census_boundaries.c.boundary <= as_of
            )
        ).scalar()
    )
    return {k: n for k, n in census_totals(conn, as_of, snapshot).items() if n}


def census_now(conn: Connection) -> dict[tuple[str, str, str, str], int]:
    """The current census: the latest snapshot plus every delta after it. It equals counting
    the active patients, but reads a few hundred rows instead of every patient."""
    snapshot = utc(conn.execute(select(func.max(census_boundaries.c.boundary))).scalar())
    return {k: n for k, n in census_totals(conn, None, snapshot).items() if n}


def _add_to_snapshots(conn: Connection, late: list[tuple[dt.datetime, Row]]) -> None:
    """Add deltas recorded at or before existing boundaries to every snapshot at or after
    them: summed per (boundary, census key) in Python, then one upsert per pair (deltas of
    interleaved partitions or writers land just behind the last boundary, so the pairs are
    few however many deltas there are)."""
    earliest = min(t for t, _ in late)
    boundaries = sorted(
        _time(b)
        for b in conn.execute(
            select(census_boundaries.c.boundary).where(census_boundaries.c.boundary >= earliest)
        ).scalars()
    )
    sums: dict[tuple[dt.datetime, str, str, str, str], int] = {}
    for recorded, d in late:
        key = (d["level"], d["site"], d["program"], d["age_group"])
        for boundary in boundaries[bisect.bisect_left(boundaries, recorded) :]:
            pair = (boundary, *key)
            sums[pair] = sums.get(pair, 0) + int(d["delta"])
    if not sums:
        return
    rows = [
        {"boundary": pair[0], **dict(zip(CENSUS_KEY, pair[1:], strict=True)), "count": n}
        for pair, n in sums.items()
    ]
    upsert = (
        pg_insert(census_snapshots)
        if conn.dialect.name == "postgresql"
        else sqlite_insert(census_snapshots)
    )
    statement = upsert.on_conflict_do_update(
        index_elements=["boundary", *CENSUS_KEY],
        set_={"count": census_snapshots.c.count + upsert.excluded.count},
    )
    conn.execute(statement, rows)


def _datetimes(table: Table) -> frozenset[str]:
    return frozenset(c.name for c in table.c if isinstance(c.type, DateTime))


DATETIME_COLUMNS: dict[str, frozenset[str]] = {
    t.name: _datetimes(t) for t in metadata.tables.values()
}


def _for_core(table: Table, row: Row, prefix: str = "") -> Row:
    """SQLAlchemy's SQLite DateTime wants datetime objects; rows carry ISO strings."""
    names = DATETIME_COLUMNS[table.name]
    return {
        k: _time(v) if isinstance(v, str) and k.removeprefix(prefix) in names else v
        for k, v in row.items()
    }


def _write(conn: Connection, table: Table, rows: list[Row]) -> None:
    """Insert rows given as dicts in bulk: COPY on PostgreSQL, an executemany elsewhere."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        columns = [c for c in rows[0] if c in table.c]
        _copy(conn, table.name, _types(table, columns), rows, _getter(columns))
    else:
        conn.execute(insert(table), [_for_core(table, row) for row in rows])


def _write_values(
    conn: Connection, table: Table, columns: Sequence[str], rows: Collection[tuple[Any, ...]]
) -> None:
    """Insert rows given as values in `columns` order (as `Changes.inserts` holds them)."""
    if conn.dialect.name == "postgresql":
        _copy(conn, table.name, _types(table, columns), rows)
    else:
        _write(conn, table, [dict(zip(columns, row, strict=True)) for row in rows])


def _types(table: Table, columns: Sequence[str]) -> dict[str, TypeEngine[Any]]:
    return {column: table.c[column].type for column in columns}


def _copy(
    conn: Connection,
    table: str,
    columns: Mapping[str, TypeEngine[Any]],
    rows: Collection[Any],
    values: Callable[[Any], tuple[Any, ...]] | None = None,
) -> None:
    """PostgreSQL bulk path: COPY, without per-row SQLAlchemy parameter processing (times go
    as the events' ISO 8601 text, which PostgreSQL parses).

    psycopg formats each column with the one formatter its SQL type calls for
    (`_copy_formats`), not one looked up for each value: the audit trail's 245,000 rows of a
    million-event rebuild took 0.49-0.55 s of the client's CPU so, against 0.78-0.87 s. A value
    of another type than its column's (the fold makes none: its times are ISO strings and its
    other values follow the event contract) cannot be formatted so; the COPY is then taken
    back to a savepoint and made again with a formatter per value, as before, and a warning
    logged.

    `rows` are the rows' values in `columns` order, or rows that `values` gives them of (taken
    anew if the COPY is made again)."""
    if not rows:
        return
    raw = conn.connection.driver_connection
    sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"

    def each() -> Iterable[tuple[Any, ...]]:
        return rows if values is None else map(values, rows)

    formats = _copy_formats(list(columns.values()), next(iter(each())))
    with raw.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute("SAVEPOINT rm_copy")
        try:
            _copy_rows(cursor, sql, each(), formats)
        except TypeError as mismatch:
            cursor.execute("ROLLBACK TO SAVEPOINT rm_copy")
            log.warning(
                "COPY %s: a value of another type than its column's (%s); written again "
                "with a formatter per value",
                table,
                mismatch,
            )
            _copy_rows(cursor, sql, each(), None)
        cursor.execute("RELEASE SAVEPOINT rm_copy")


def _copy_rows(
    cursor: Any, sql: str, rows: Iterable[tuple[Any, ...]], formats: list[str] | None
) -> None:
    with cursor.copy(sql) as copy:
        if formats is not None:
            copy.set_types(formats)
        for row in rows:
            copy.write_row(row)


def _copy_formats(types: Sequence[TypeEngine[Any]], first: Sequence[Any]) -> list[str]:
    """The PostgreSQL type whose formatter psycopg uses for each column: by the column's SQL
    type, and for a time column by its value in the first row (ISO text from the fold, a
    datetime from the snapshots' cutting)."""
    formats = []
    for kind, value in zip(types, first, strict=True):
        if isinstance(kind, Boolean):
            formats.append("bool")
        elif isinstance(kind, Integer):  # BigInteger too
            formats.append("int8")
        elif isinstance(kind, Float):
            formats.append("float8")  # takes ints as well
        elif isinstance(kind, DateTime) and isinstance(value, dt.datetime):
            formats.append("timestamptz")
        else:  # text, and times as ISO text
            formats.append("text")
    return formats


def _getter(columns: Sequence[str]) -> Callable[[Row], tuple[Any, ...]]:
    """A row's values in `columns` order, as a tuple, taken in C."""
    if len(columns) == 1:
        (column,) = columns
        return lambda row: (row[column],)
    return operator.itemgetter(*columns)


#: Below this many rows an UPDATE per row (pipelined) beats a temporary table.
BULK_UPDATE_FROM = 64
_temp_tables = itertools.count()


def _update(
    conn: Connection, table: Table, key: str, fields: tuple[str, ...], params: list[Row]
) -> None:
    if conn.dialect.name != "postgresql":
        rows = [_for_core(table, row, "v_") for row in params]
        conn.execute(_update_by_key(table, key, fields), rows)
        return
    raw = conn.connection.driver_connection
    with raw.cursor() as cursor:  # type: ignore[union-attr]
        if len(params) < BULK_UPDATE_FROM:
            sets = ", ".join(f"{f} = %(v_{f})s" for f in fields)
            cursor.executemany(f"UPDATE {table.name} SET {sets} WHERE {key} = %(_key)s", params)
            return
        # Many rows: COPY them into a temporary table, then one UPDATE ... FROM.
        temp = f"rm_patch_{next(_temp_tables)}"
        types = ", ".join(f"{f} {table.c[f].type.compile(dialect=conn.dialect)}" for f in fields)
        key_type = table.c[key].type.compile(dialect=conn.dialect)
        cursor.execute(f"CREATE TEMPORARY TABLE {temp} (_key {key_type}, {types}) ON COMMIT DROP")
        getter = _getter(["_key", *(f"v_{f}" for f in fields)])
        columns = {"_key": table.c[key].type, **_types(table, fields)}
        _copy(conn, temp, columns, params, getter)
        sets = ", ".join(f"{f} = p.{f}" for f in fields)
        cursor.execute(
            f"UPDATE {table.name} AS t SET {sets} FROM {temp} AS p WHERE t.{key} = p._key"
        )


class StaleBatch(ReadModelError):
    """A batch whose events another writer has projected since it was read (fenced)."""

    rule = "read_model.stale_batch"


def _fence(conn: Connection, starts: Mapping[str, int]) -> None:
    """Refuse a batch if a checkpoint it moves is already past where the batch began; on
    PostgreSQL the checkpoint rows stay locked until this transaction ends, so two writers of
    one partition cannot both pass."""
    query = select(checkpoints.c.name, checkpoints.c.position).where(
        checkpoints.c.name.in_(sorted(starts))
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    for name, saved in conn.execute(query):
        if saved > starts[name]:
            raise _stale(name, int(saved), starts[name])


def _stale(name: str, saved: int, start: int | None) -> StaleBatch:
    return StaleBatch(
        f"checkpoint {name} is at {saved}, past {start} where this batch began: another "
        "worker projected these events while this one stalled; the batch is dropped and "
        "the partition read again from the saved offset",
        checkpoint=name,
        saved=saved,
        start=start,
    )


def _put_checkpoint(
    conn: Connection, name: str, position: int, now: dt.datetime, start: int | None = None
) -> None:
    statement = update(checkpoints).where(checkpoints.c.name == name)
    if start is not None:
        statement = statement.where(checkpoints.c.position <= start)
    changed = conn.execute(statement.values(position=position, updated_at=now)).rowcount
    if changed:
        return
    saved = conn.execute(select(checkpoints.c.position).where(checkpoints.c.name == name)).scalar()
    if saved is not None:
        # Only reachable with `start`: the checkpoint moved past where this batch began.
        raise _stale(name, int(saved), start)
    upsert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    created = conn.execute(
        upsert(checkpoints)
        .values(name=name, position=position, updated_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(checkpoints.c.name)
    ).first()
    if created is None:  # another writer created it meanwhile: this batch is not the first
        raise StaleBatch(
            f"checkpoint {name} was created by another writer while this batch was written",
            checkpoint=name,
            start=start,
        )


def _group_patches(patches: dict[str, Row]) -> dict[tuple[str, ...], list[Row]]:
    """Patches grouped by the columns they set, as parameters for `_update_by_key`."""
    groups: dict[tuple[str, ...], list[Row]] = {}
    for key, values in patches.items():
        fields = tuple(sorted(values))
        params = {"_key": key, **{f"v_{f}": v for f, v in values.items()}}
        groups.setdefault(fields, []).append(params)
    return groups


def _update_by_key(table: Table, key: str, fields: Iterable[str]) -> Any:
    return (
        update(table)
        .where(table.c[key] == bindparam("_key"))
        .values({f: bindparam(f"v_{f}") for f in fields})
    )
