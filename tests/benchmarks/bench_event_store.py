"""Append throughput of care-continuum's SqlEventStore against the `eventsourcing` library.

Run it directly (pytest does not collect it):

    .venv/bin/python tests/benchmarks/bench_event_store.py            # full run, a few minutes
    .venv/bin/python tests/benchmarks/bench_event_store.py --quick    # smoke run, seconds

The workload is the same for both libraries. W writer threads (1 and 8) each own 20 patient
streams and append one event per call, cycling over their streams and appending the next
version each time. Every append carries a freshly built `ReassessmentRecorded` event (new
event id, ~420 bytes of `data`, ~850 bytes as a whole envelope):

* care-continuum: `SqlEventStore.append(stream_id, expected_version, [event])`;
* eventsourcing: the event serialized to JSON bytes (what an eventsourcing transcoder would
  produce) in a `StoredEvent(originator_id=stream_id, originator_version=version, ...)` passed
  to `ApplicationRecorder.insert_events`.

Each configuration gets a fresh database: a new PostgreSQL schema (dropped afterwards) or a
new SQLite file in a temporary directory, its own connection pool sized for the writers, and
a warm-up (a few appends per writer, not timed) before the timed appends start together.
Throughput is timed appends / wall time of the timed phase; latency is per append call.
Every configuration runs `--rounds` times (the two libraries take turns going first) and the
summary reports the median rate.

CPU per append is measured too, because on a small machine the figures are CPU-bound:
"client" is this process (both libraries' Python code, and SQLite itself), "server" is the
PostgreSQL backends serving the run plus the WAL writer, checkpointer and background writer.
"machine" is every core's busy time, so machine - client - server is interference from
anything else running on the host.

After every care-continuum run the log is checked: pending rows drained, positions 1..N
dense, every appended event present exactly once, each stream's versions in position order.
After every eventsourcing run the stored rows are counted and notification ids checked unique.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from eventsourcing.persistence import ApplicationRecorder, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.adapters.sql.store import SqlEventStore
from continuum_events import PatientEvent, parse_event

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/continuum_test"
STREAMS_PER_WRITER = 20
WARMUP_PER_WRITER = 40
DEFAULT_EVENTS = 1000
QUICK_EVENTS = 100
DEFAULT_ROUNDS = 3
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
CC = "care-continuum"
ES = "eventsourcing"
LIBRARIES = (CC, ES)
TOPIC = "continuum_events.patient:ReassessmentRecorded"
T0 = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)
SERVER_HELPERS = ("walwriter", "checkpointer", "background writer")


# -- the workload -----------------------------------------------------------------------------


def patient_key() -> str:
    """A valid pseudonymous patient key: "pk-" and 20 base32 characters."""
    raw = uuid.uuid4().int
    return "pk-" + "".join(BASE32[(raw >> (5 * i)) & 31] for i in range(20))


def make_event(stream_id: str, version: int, episode_id: uuid.UUID) -> PatientEvent:
    """A realistic `ReassessmentRecorded` event for `stream_id` at `version`."""
    occurred = T0 + dt.timedelta(hours=version)
    return parse_event(
        {
            "event_id": str(uuid.uuid4()),
            "event_type": "ReassessmentRecorded",
            "schema_version": 1,
            "stream_id": stream_id,
            "stream_version": version,
            "occurred_at": occurred.isoformat(),
            "recorded_at": (occurred + dt.timedelta(minutes=7)).isoformat(),
            "actor": {"id": "clin-0042", "role": "clinician"},
            "correlation_id": str(uuid.uuid4()),
            "causation_id": str(uuid.uuid4()),
            "policy": {"id": "asam-4e", "version": "2026.1"},
            "data": {
                "episode_id": str(episode_id),
                "level_at_assessment": "2.1",
                "assessment": {
                    "instrument": "asam-criteria-4e",
                    "assessor_id": "clin-0042",
                    "ratings": {"d1": "1", "d2": "0", "d3": "2", "d4": "1", "d5": "3", "d6": "2"},
                    "indicated_level": "2.5",
                    "hours_scheduled": 20.0,
                    "scores": {"ciwa-ar": 8.0, "cows": 4.0, "phq-9": 11.0, "gad-7": 9.0},
                    "source_ref": f"ehr:note:{uuid.uuid4().hex}",
                },
            },
        }
    )


class Target(Protocol):
    """One library on one database, ready to take appends."""

    def append(self, event: PatientEvent) -> None: ...


class ContinuumTarget:
    def __init__(self, engine: Engine) -> None:
        self.store = SqlEventStore(engine)

    def append(self, event: PatientEvent) -> None:
        self.store.append(event.stream_id, event.stream_version - 1, [event])


class EventsourcingTarget:
    def __init__(self, recorder: ApplicationRecorder) -> None:
        self.recorder = recorder

    def append(self, event: PatientEvent) -> None:
        stored = StoredEvent(
            originator_id=event.stream_id,
            originator_version=event.stream_version,
            topic=TOPIC,
            state=event.model_dump_json().encode(),
        )
        self.recorder.insert_events([stored])


@dataclass
class Writer:
    """One writer thread's streams, and what it appended."""

    streams: list[str]
    episode_id: uuid.UUID = field(default_factory=uuid.uuid4)
    appended: int = 0
    event_ids: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    error: BaseException | None = None

    def run(self, target: Target, warmup: int, timed: int, barrier: threading.Barrier) -> None:
        try:
            for _ in range(warmup):
                self._append(target, timed=False)
        except BaseException as exc:
            self.error = exc
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        try:
            self.started = time.perf_counter()
            for _ in range(timed):
                self._append(target, timed=True)
            self.finished = time.perf_counter()
        except BaseException as exc:
            self.error = exc

    def _append(self, target: Target, *, timed: bool) -> None:
        stream = self.streams[self.appended % len(self.streams)]
        event = make_event(stream, self.appended // len(self.streams) + 1, self.episode_id)
        begin = time.perf_counter()
        target.append(event)
        if timed:
            self.latencies.append(time.perf_counter() - begin)
        self.appended += 1
        self.event_ids.append(str(event.event_id))


# -- CPU accounting ---------------------------------------------------------------------------


def machine_cpu_seconds() -> float | None:
    """CPU seconds all cores have been busy since boot (Linux), or None elsewhere."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in first[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def processes_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (those that still exist)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        after_name = stat.rsplit(")", 1)[1].split()
        ticks += int(after_name[11]) + int(after_name[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU used during the timed phase: this process, the database server, the machine."""

    server_pids: Callable[[], list[int]] | None = None
    client: float = 0.0
    server: float | None = None
    machine: float | None = None
    _pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        self._pids = self.server_pids() if self.server_pids else []
        self.server = -processes_cpu_seconds(self._pids) if self.server_pids else None
        machine = machine_cpu_seconds()
        self.machine = None if machine is None else -machine
        self.client = -time.process_time()

    def stop(self) -> None:
        self.client += time.process_time()
        if self.server is not None:
            self.server += processes_cpu_seconds(self._pids)
        machine = machine_cpu_seconds()
        self.machine = None if machine is None or self.machine is None else self.machine + machine


def run_workload(
    target: Target,
    writers: int,
    per_writer: int,
    warmup: int,
    server_pids: Callable[[], list[int]] | None,
) -> tuple[list[Writer], float, CpuMeter]:
    """Run `writers` threads against `target`; return them, the timed phase's wall time, and
    the CPU it took."""
    crew = [Writer([patient_key() for _ in range(STREAMS_PER_WRITER)]) for _ in range(writers)]
    cpu = CpuMeter(server_pids)
    barrier = threading.Barrier(writers, action=cpu.start)
    threads = [
        threading.Thread(target=w.run, args=(target, warmup, per_writer, barrier), daemon=True)
        for w in crew
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu.stop()
    for w in crew:
        if w.error is not None:
            raise RuntimeError(f"a writer failed: {w.error!r}") from w.error
    return crew, max(w.finished for w in crew) - min(w.started for w in crew), cpu


# -- the databases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """A fresh target for one library on one backend, and how to check it afterwards."""

    target: Target
    verify: Callable[[list[Writer]], str]
    server_pids: Callable[[], list[int]] | None = None


SetupFactory = Callable[[str, int], AbstractContextManager[Setup]]


@contextmanager
def postgres_setup(url: str, library: str, writers: int) -> Iterator[Setup]:
    """A new schema, migrated (ours) or with `create_table()` (eventsourcing); dropped after.

    Every connection the run opens carries the schema name as its application_name (PGAPPNAME
    is read by libpq, for both libraries), which is how the server's CPU is attributed."""
    schema = f"bench_{'cc' if library == CC else 'es'}_w{writers}_{uuid.uuid4().hex[:8]}"
    admin = create_database_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def server_pids() -> list[int]:
        with admin.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
                        "OR backend_type = ANY(:helpers)"
                    ),
                    {"name": schema, "helpers": list(SERVER_HELPERS)},
                ).scalars()
            )

    previous_name = os.environ.get("PGAPPNAME")
    os.environ["PGAPPNAME"] = schema
    try:
        if library == CC:
            engine = create_database_engine(url, schema=schema, pool_size=writers + 2)
            try:
                upgrade(engine)
                yield Setup(
                    ContinuumTarget(engine),
                    lambda crew: verify_continuum(engine, crew),
                    server_pids,
                )
            finally:
                engine.dispose()
        else:
            parsed = make_url(url)
            datastore = PostgresDatastore(
                dbname=parsed.database or "",
                host=parsed.host or "127.0.0.1",
                port=parsed.port or 5432,
                user=parsed.username or "postgres",
                password=parsed.password or "",
                pool_size=writers + 2,
                schema=schema,
                originator_id_type="text",
            )
            try:
                recorder = PostgresApplicationRecorder(datastore)
                recorder.create_table()
                query = (
                    "SELECT count(*), count(DISTINCT notification_id) "
                    f'FROM "{schema}"."{recorder.events_table_name}"'
                )
                yield Setup(
                    EventsourcingTarget(recorder),
                    lambda crew: verify_eventsourcing(crew, admin, query),
                    server_pids,
                )
            finally:
                datastore.close()
    finally:
        if previous_name is None:
            os.environ.pop("PGAPPNAME", None)
        else:
            os.environ["PGAPPNAME"] = previous_name
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def sqlite_setup(directory: Path, library: str, writers: int) -> Iterator[Setup]:
    """A new database file in `directory`, each library with its own defaults (WAL for both)."""
    path = directory / f"{'cc' if library == CC else 'es'}-w{writers}-{uuid.uuid4().hex[:8]}.db"
    if library == CC:
        engine = create_database_engine(f"sqlite:///{path}")
        try:
            upgrade(engine)
            yield Setup(ContinuumTarget(engine), lambda crew: verify_continuum(engine, crew))
        finally:
            engine.dispose()
    else:
        datastore = SQLiteDatastore(
            str(path),
            lock_timeout=60,  # the same busy timeout as ours; its default of 5 s could fail
            pool_size=writers + 2,
            pool_timeout=60.0,
            originator_id_type="text",
        )
        try:
            recorder = SQLiteApplicationRecorder(datastore)
            recorder.create_table()
            yield Setup(
                EventsourcingTarget(recorder),
                lambda crew: verify_sqlite_rows(path, crew, recorder.events_table_name),
            )
        finally:
            datastore.close()


def verify_continuum(engine: Engine, crew: Sequence[Writer]) -> str:
    """Check the log a run left behind; raise if anything is off."""
    SqlEventStore(engine).sequence()  # what a reader does first: number what is left pending
    expected = {event_id for w in crew for event_id in w.event_ids}
    appended = sum(len(w.event_ids) for w in crew)
    with engine.connect() as conn:
        pending = conn.execute(text("SELECT count(*) FROM event_pending")).scalar_one()
        rows, low, high, distinct = conn.execute(
            text(
                "SELECT count(*), min(position), max(position), count(DISTINCT row_id) "
                "FROM event_log"
            )
        ).one()
        ids = list(
            conn.execute(
                text("SELECT e.event_id FROM event_log l JOIN events e ON e.row_id = l.row_id")
            ).scalars()
        )
        misordered = conn.execute(
            text(
                "SELECT count(*) FROM ("
                " SELECT e.stream_version AS version, l.position,"
                "  lag(l.position) OVER w AS previous_position,"
                "  lag(e.stream_version) OVER w AS previous_version"
                " FROM events e JOIN event_log l ON l.row_id = e.row_id"
                " WINDOW w AS (PARTITION BY e.stream_id ORDER BY e.stream_version)) s"
                " WHERE s.previous_position > s.position OR s.previous_version <> s.version - 1"
            )
        ).scalar_one()
    problems = []
    if pending:
        problems.append(f"{pending} events still pending")
    if rows != appended or distinct != appended:
        problems.append(f"{rows} log rows ({distinct} distinct events) for {appended} appends")
    if (low, high) != (1, appended):
        problems.append(f"positions {low}..{high}, expected 1..{appended}")
    if len(ids) != len(set(ids)) or set(ids) != expected:
        problems.append("the logged event ids differ from the appended ones")
    if misordered:
        problems.append(f"{misordered} events out of stream order")
    if problems:
        raise AssertionError("care-continuum log is wrong: " + "; ".join(problems))
    return f"positions 1..{appended} dense, each appended event once, streams in order"


def verify_eventsourcing(crew: Sequence[Writer], engine: Engine, query: str) -> str:
    appended = sum(len(w.event_ids) for w in crew)
    with engine.connect() as conn:
        rows, distinct = conn.execute(text(query)).one()
    if rows != appended or distinct != appended:
        raise AssertionError(f"eventsourcing stored {rows} rows ({distinct} ids), not {appended}")
    return f"{appended} rows, notification ids unique"


def verify_sqlite_rows(path: Path, crew: Sequence[Writer], table: str) -> str:
    appended = sum(len(w.event_ids) for w in crew)
    conn = sqlite3.connect(path)
    try:
        (rows,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    finally:
        conn.close()
    if rows != appended:
        raise AssertionError(f"eventsourcing stored {rows} rows, not {appended}")
    return f"{appended} rows"


# -- settings report --------------------------------------------------------------------------


def describe_postgres(url: str) -> str:
    engine = create_database_engine(url)
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar_one()
            settings = {
                name: conn.execute(text(f"SHOW {name}")).scalar_one()
                for name in ("fsync", "synchronous_commit", "wal_sync_method", "full_page_writes")
            }
    finally:
        engine.dispose()
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"PostgreSQL {version.split()[0]}: {shown} (one server, the same for both libraries)"


def describe_sqlite(directory: Path) -> str:
    """Read back the journal mode and synchronous level each library's connections get."""
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    engine = create_database_engine(f"sqlite:///{directory / 'probe-cc.db'}")
    try:
        with engine.connect() as conn:
            cc_journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
            cc_sync = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
    finally:
        engine.dispose()
    datastore = SQLiteDatastore(str(directory / "probe-es.db"))
    try:
        with datastore.transaction(commit=False) as curs:
            curs.execute("PRAGMA journal_mode")
            es_journal = curs.fetchone()[0]
            curs.execute("PRAGMA synchronous")
            es_sync = curs.fetchone()[0]
    finally:
        datastore.close()
    return (
        f"SQLite {sqlite3.sqlite_version}: {CC} journal_mode={cc_journal} "
        f"synchronous={names[cc_sync]}, writes BEGIN IMMEDIATE, busy_timeout 60 s; "
        f"{ES} journal_mode={es_journal} synchronous={names[es_sync]}, writes BEGIN (deferred) "
        "behind an in-process writer lock"
    )


# -- running and reporting --------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    round_no: int
    backend: str
    library: str
    writers: int
    seconds: float
    latencies: tuple[float, ...]
    client_cpu: float
    server_cpu: float | None
    machine_cpu: float | None

    @property
    def appends(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.appends / self.seconds

    def per_append_ms(self, seconds: float | None) -> float | None:
        return None if seconds is None else seconds / self.appends * 1000

    @property
    def interference(self) -> float | None:
        """Cores' worth of CPU used by other processes on the machine during the run."""
        if self.machine_cpu is None:
            return None
        ours = self.client_cpu + (self.server_cpu or 0.0)
        return max(0.0, self.machine_cpu - ours) / self.seconds

    def cpu_note(self) -> str:
        client = self.per_append_ms(self.client_cpu)
        server = self.per_append_ms(self.server_cpu)
        note = f"cpu/append client {client:.2f} ms"
        if server is not None:
            note += f" + server {server:.2f} ms"
        if self.interference is not None:
            note += f", others {self.interference:.2f} cores"
        return note


def quantile_ms(latencies: Sequence[float], q: float) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run_config(
    setup_factory: SetupFactory,
    *,
    round_no: int,
    backend: str,
    library: str,
    writers: int,
    per_writer: int,
    warmup: int,
) -> Result:
    with setup_factory(library, writers) as setup:
        crew, seconds, cpu = run_workload(
            setup.target, writers, per_writer, warmup, setup.server_pids
        )
        check = setup.verify(crew)
    latencies = tuple(latency for w in crew for latency in w.latencies)
    result = Result(
        round_no, backend, library, writers, seconds, latencies, cpu.client, cpu.server, cpu.machine
    )
    print(
        f"  {backend:<10} {writers} writer{'s' if writers > 1 else ' '} {library:<14} "
        f"{result.appends:>5} in {seconds:5.2f} s = {result.rate:6,.0f}/s  "
        f"p50 {quantile_ms(latencies, 0.5):5.2f} ms  p99 {quantile_ms(latencies, 0.99):6.2f} ms  "
        f"{result.cpu_note()}  [{check}]",
        flush=True,
    )
    return result


def paired_ratios(results: Sequence[Result], backend: str, writers: int) -> list[float]:
    """care-continuum / eventsourcing rate within each round: the two ran back to back, so the
    ratio is less exposed to the host's load drifting between rounds than either rate is."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        if (r.backend, r.writers) == (backend, writers):
            by_round.setdefault(r.round_no, {})[r.library] = r.rate
    return [rates[CC] / rates[ES] for rates in by_round.values() if len(rates) == len(LIBRARIES)]


def report(results: Sequence[Result], backends: Sequence[str], writer_counts: Sequence[int]) -> str:
    """The summary: throughput (medians over rounds) and latency and CPU (all rounds pooled)."""
    throughput = [
        f"| backend | writers | {CC} appends/s | {ES} appends/s | ratio | ratio per round |",
        "|---|---:|---:|---:|---:|---|",
    ]
    detail = [
        "| backend | writers | library | p50 ms | p99 ms | client CPU ms/append "
        "| server CPU ms/append |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for backend in backends:
        for writers in writer_counts:
            rates: dict[str, float] = {}
            for library in LIBRARIES:
                runs = [
                    r
                    for r in results
                    if (r.backend, r.library, r.writers) == (backend, library, writers)
                ]
                if not runs:
                    continue
                rates[library] = median([r.rate for r in runs])
                latencies = [x for r in runs for x in r.latencies]
                appends = sum(r.appends for r in runs)
                client = sum(r.client_cpu for r in runs) / appends * 1000
                servers = [r.server_cpu for r in runs if r.server_cpu is not None]
                server = f"{sum(servers) / appends * 1000:.2f}" if servers else "(in client)"
                detail.append(
                    f"| {backend} | {writers} | {library} | {quantile_ms(latencies, 0.5):.2f} "
                    f"| {quantile_ms(latencies, 0.99):.2f} | {client:.2f} | {server} |"
                )
            ratios = paired_ratios(results, backend, writers)
            if ratios:
                each = ", ".join(f"{x:.2f}" for x in ratios)
                throughput.append(
                    f"| {backend} | {writers} | {rates[CC]:,.0f} | {rates[ES]:,.0f} "
                    f"| **{median(ratios):.2f}x** | {each} |"
                )
    return "\n".join(
        [
            "Throughput: median over rounds; ratio = median of the per-round ratios "
            f"({CC} / {ES}).",
            "",
            *throughput,
            "",
            "Latency per append call, all rounds pooled; CPU per append (client = this process, "
            "server = the PostgreSQL processes serving the run).",
            "",
            *detail,
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Append throughput: care-continuum's SQL event store vs eventsourcing."
    )
    parser.add_argument(
        "--events",
        type=int,
        default=None,
        help=f"timed appends per writer per configuration (default {DEFAULT_EVENTS}, "
        f"{QUICK_EVENTS} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and one round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"runs of every configuration; the summary takes the median rate "
        f"(default {DEFAULT_ROUNDS}, 1 with --quick)",
    )
    parser.add_argument("--writers", default="1,8", help="writer counts (default 1,8)")
    parser.add_argument("--backends", default="sqlite,postgresql", help="(default both)")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("CONTINUUM_TEST_DATABASE_URL", DEFAULT_PG_URL),
        help="PostgreSQL database to create scratch schemas in "
        "(default $CONTINUUM_TEST_DATABASE_URL or the local continuum_test)",
    )
    args = parser.parse_args(argv)
    per_writer = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
    rounds = args.rounds or (1 if args.quick else DEFAULT_ROUNDS)
    warmup = WARMUP_PER_WRITER // 4 if args.quick else WARMUP_PER_WRITER
    writer_counts = [int(w) for w in args.writers.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown backends: {sorted(unknown)}")

    with tempfile.TemporaryDirectory(prefix="continuum-bench-") as scratch:
        directory = Path(scratch)
        factories: dict[str, SetupFactory] = {
            "sqlite": lambda library, writers: sqlite_setup(directory, library, writers),
            "postgresql": lambda library, writers: postgres_setup(args.pg_url, library, writers),
        }
        print(
            f"{per_writer} timed appends per writer after {warmup} warm-up appends, "
            f"{STREAMS_PER_WRITER} streams per writer, {rounds} round(s); "
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
            flush=True,
        )
        if "sqlite" in backends:
            print(describe_sqlite(directory), flush=True)
        if "postgresql" in backends:
            print(describe_postgres(args.pg_url), flush=True)
        results: list[Result] = []
        for round_no in range(rounds):
            print(f"round {round_no + 1}/{rounds}", flush=True)
            order = LIBRARIES if round_no % 2 == 0 else LIBRARIES[::-1]
            for backend in backends:
                for writers in writer_counts:
                    for library in order:
                        result = run_config(
                            factories[backend],
                            round_no=round_no,
                            backend=backend,
                            library=library,
                            writers=writers,
                            per_writer=per_writer,
                            warmup=warmup,
                        )
                        results.append(result)
    print()
    print(report(results, backends, writer_counts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
