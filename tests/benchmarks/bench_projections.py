"""Projection rebuild throughput, peak memory, and census-as-of latency, beside `eventsourcing`.

Run it directly (pytest does not collect it):

    .venv/bin/python tests/benchmarks/bench_projections.py            # 1,000,000 events
    .venv/bin/python tests/benchmarks/bench_projections.py --quick    # 50,000 events

What it does, in one run:

1. **Dataset.** N synthetic events made by the real domain path: `simulate_cohort` drives
   `PatientService` over an `InMemoryEventStore`, in chunks of a few thousand patients run by
   worker processes, each chunk over the same 365 clinical days. The service's clock follows
   the commands: every event is recorded a random 1-180 minutes after its clinical time, and
   never before the previous one, so recorded times spread over the year like a real log's.
   The chunks' logs are merged by recorded time, cut at exactly N events, and COPYed into a
   dedicated PostgreSQL schema (`bench_proj_<N>_<seed>`): our `events` rows (with `body`, the
   canonical wire bytes with a null position, exactly as the store's append writes them) and
   `event_log` (position = row id), and the same events, in the same order, into
   eventsourcing's own stored-events table (`PostgresApplicationRecorder`,
   `originator_id_type=text`; topic `continuum.v1:<event type>`; state = the canonical wire
   bytes with the position in, i.e. exactly what our `read_wire` returns). A sample is read
   back through `SqlEventStore.read_wire` and checked against `canonical_json` of the parsed
   event and against eventsourcing's stored state. The schema is kept and reused by later
   runs (`--regenerate` rebuilds it).
2. **Our rebuild.** `StoreRunner` + `ReadModel` (census, census deltas and snapshots, stays,
   episodes, the step-down audit trail: everything the census, audit and metrics reports read)
   from position 0 into a fresh schema, with the runner's defaults (pages of 5,000, one
   transaction per 20,000 events). It runs in a child process started with `spawn`, so its
   peak RSS (`ru_maxrss`) is the rebuild's alone.
3. **eventsourcing's rebuild of the census** (active patients by level) with its
   `ProjectionRunner`: the application subscribes to its stored-events table, the mapper turns
   each stored event back into an object, and a `Projection` writes its view (per-patient level
   and void undo stack, and counts per level) with its tracking record in a
   `PostgresTrackingRecorder` subclass, in the same transaction. Three configurations:
   - `es batched`: the census topics only (the 5 placement-changing event types, via the
     runner's `topics` filter), view + tracking written once per 20,000 events, like ours;
   - `es batched, all topics`: the same, subscribed to every event (the same input as ours);
   - `es per event`: the library's idiomatic pattern (one view + tracking transaction per
     event, as in its documentation and tests), on the first `--es-per-event-events` events.
   Each runs in its own child process too. The census each batched run ends with is checked
   equal to ours.
4. **As-of queries** on our rebuilt read model: `reports.census_as_of` at `--moments` random
   recorded times over the log's span, and `reports.census_in_care_at` at as many random
   clinical times; p50, p99, max.

`--profile` adds a cProfile of our rebuild (another child) and prints the top 20 functions by
cumulative time. Progress lines go to stderr; the summary to stdout.

CPU is accounted as in bench_event_store.py: "client" is the child process, "server" the
PostgreSQL backends it used (found by application_name), "others" whatever else the machine's
cores did meanwhile (other jobs on a shared host), in cores.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import functools
import heapq
import io
import math
import multiprocessing as mp
import os
import pstats
import random
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import orjson
import psycopg
from eventsourcing.application import Application
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import (
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresTrackingRecorder,
)
from eventsourcing.projection import Projection, ProjectionRunner
from eventsourcing.utils import register_topic
from psycopg import sql
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.support, for shards too

from continuum.adapters.memory import InMemoryEventStore
from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.application.ports import AppendResult
from continuum.application.service import CommandContext, PatientService
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from continuum_events import EVENT_TYPES, canonical_json, parse_event, wire
from continuum_projections.parallel import SHARD_BATCH
from tests.support import open_rebuild_parts

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/continuum_test"
DEFAULT_EVENTS = 1_000_000
QUICK_EVENTS = 50_000
DEFAULT_SEED = 7
DEFAULT_MOMENTS = 200
#: The simulation over 365 days makes about 16.4 events per patient; ask for 10 % more.
EVENTS_PER_PATIENT = 16.4
OVERSIZE = 1.10
DAYS = 365
PATIENTS_PER_CHUNK = 4_000
SIM_END = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
FLUSH_EVERY = 20_000  # StoreRunner's default; the batched eventsourcing view uses the same
ES_APP = "ContinuumLog"  # eventsourcing application name: its table is continuumlog_events
ES_TABLE = ES_APP.lower() + "_events"
ES_PROJECTION = "escensus"
TOPIC_PREFIX = "continuum.v1:"
CENSUS_EVENT_TYPES = (
    "PatientAdmitted",
    "PatientReadmitted",
    "LevelTransitioned",
    "PatientDischarged",
    "EventVoided",
)
TARGETS = {"events_per_s": 50_000, "peak_rss_mb": 500, "as_of_ms": 200}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- PostgreSQL helpers -------------------------------------------------------------------------


@dataclass(frozen=True)
class PgInfo:
    url: str
    host: str
    port: int
    user: str
    password: str
    dbname: str

    @classmethod
    def of(cls, url: str) -> PgInfo:
        parsed = make_url(url)
        return cls(
            url=url,
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 5432,
            user=parsed.username or "postgres",
            password=parsed.password or "",
            dbname=parsed.database or "",
        )

    def connect(self, schema: str | None = None, *, autocommit: bool = False) -> psycopg.Connection:
        options = f"-csearch_path={schema}" if schema else ""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password or None,
            dbname=self.dbname,
            options=options,
            autocommit=autocommit,
        )

    def es_env(self, schema: str) -> dict[str, str]:
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": self.dbname,
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            "POSTGRES_SCHEMA": schema,
            "ORIGINATOR_ID_TYPE": "text",
        }


def schema_exists(pg: PgInfo, schema: str) -> bool:
    with pg.connect(autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    return row is not None


def drop_schema(pg: PgInfo, schema: str) -> None:
    with pg.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def create_schema(pg: PgInfo, schema: str) -> None:
    with pg.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))


# -- CPU and memory accounting ------------------------------------------------------------------


def machine_cpu_seconds() -> float | None:
    """CPU seconds all cores have been busy since boot (Linux), or None elsewhere."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in first[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def processes_cpu_seconds(pids: Sequence[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        after_name = stat.rsplit(")", 1)[1].split()
        ticks += int(after_name[11]) + int(after_name[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def server_cpu_seconds(pg: PgInfo, application_name: str) -> float:
    """CPU of the backends serving connections named `application_name` (still open)."""
    with pg.connect(autocommit=True) as conn:
        pids = [
            int(row[0])
            for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND pid <> pg_backend_pid()",
                (application_name,),
            ).fetchall()
        ]
    return processes_cpu_seconds(pids)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# -- 1. the dataset -------------------------------------------------------------------------------


class RecordingClock:
    """The service's clock, moved by `RecordingService` before each command: a command is
    recorded 1-180 minutes after its clinical time, and never before the previous one."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.now = SIM_END - dt.timedelta(days=DAYS + 1)

    def __call__(self) -> dt.datetime:
        return self.now

    def follow(self, occurred_at: dt.datetime | None) -> None:
        step = self.now + dt.timedelta(milliseconds=1)
        if occurred_at is not None:
            lag = dt.timedelta(minutes=self.rng.uniform(1, 180))
            step = max(step, occurred_at + lag)
        self.now = step


class RecordingService(PatientService):
    def __init__(self, store: InMemoryEventStore, policies: PolicyRegistry, clock: RecordingClock):
        super().__init__(store, policies, clock)
        self.recording_clock = clock

    def handle(self, command: c.Command, ctx: CommandContext | None = None) -> AppendResult:
        self.recording_clock.follow(getattr(command, "occurred_at", None))
        return super().handle(command, ctx)


def _monotonic(journey: Callable[..., Generator[Any, Any, None]]) -> Callable[..., Any]:
    """Wrap cohort._journey so that no step goes back in time.

    Works around a simulation bug: after a refused move, the fix (reassessment, then the move
    30 minutes later, cohort.py line 293) checks only the reassessment's time against the
    episode's exit, so the discharge can come up to 30 minutes before the move and
    simulate_cohort stops with "journey went back in time". Such a step is moved to one
    minute after the previous one."""

    def wrapped(*args: Any) -> Generator[Any, Any, None]:
        inner = journey(*args)
        last: dt.datetime | None = None
        try:
            step = next(inner)
            while True:
                when, command, ctx = step
                if last is not None and when < last:
                    when = last + dt.timedelta(minutes=1)
                    command = command.model_copy(update={"occurred_at": when})
                last = when
                outcome = yield (when, command, ctx)
                step = inner.send(outcome)
        except StopIteration:
            return

    return wrapped


_COMMANDS: Any = None  # a shared counter in generator workers


def _init_generator(counter: Any) -> None:
    global _COMMANDS  # noqa: PLW0603 - one per worker process
    _COMMANDS = counter


def generate_chunk(job: tuple[int, int, int, str]) -> tuple[int, int, int]:
    """Simulate one chunk of patients; write `recorded_us <TAB> body` lines in log order,
    where body is the event's canonical wire bytes with a null position (the store's `body`)."""
    index, patients, seed, path = job
    from continuum.simulation import cohort

    if not getattr(cohort._journey, "monotonic", False):
        patched = _monotonic(cohort._journey)
        patched.monotonic = True  # type: ignore[attr-defined]
        cohort._journey = patched
    store = InMemoryEventStore()
    clock = RecordingClock(random.Random(seed ^ 0x5EED))
    service = RecordingService(store, PolicyRegistry.bundled(), clock)
    last = 0

    def progress(commands: int, _total: int, _rate: float) -> None:
        nonlocal last
        if _COMMANDS is not None:
            with _COMMANDS.get_lock():
                _COMMANDS.value += commands - last
        last = commands

    simulate_cohort(
        service, patients=patients, days=DAYS, seed=seed, end=SIM_END, progress=progress
    )
    events = store.read_all(0, 1 << 62)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    with open(path, "w", encoding="utf-8") as out:
        for event in events:
            body = event.model_dump(mode="json")
            body["position"] = None
            micros = (event.recorded_at - epoch) // dt.timedelta(microseconds=1)
            out.write(f"{micros}\t{wire.dumps(body).decode('utf-8')}\n")
    return index, len(events), patients


def generate(n_events: int, seed: int, workers: int, directory: Path) -> tuple[list[Path], int]:
    """Chunks of simulated events, at least `n_events` in all; returns files and patients."""
    patients = math.ceil(n_events * OVERSIZE / EVENTS_PER_PATIENT)
    chunks = max(workers, math.ceil(patients / PATIENTS_PER_CHUNK))
    per_chunk = math.ceil(patients / chunks)
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    files: list[Path] = []
    produced = 0
    total_patients = 0
    started = time.perf_counter()
    next_index = 0
    while produced < n_events:
        jobs = [
            (i, per_chunk, seed * 1_000_003 + i, str(directory / f"chunk-{i:03d}.tsv"))
            for i in range(next_index, next_index + chunks)
        ]
        next_index += chunks
        expected = produced + per_chunk * len(jobs) * EVENTS_PER_PATIENT
        say(
            f"generating ~{expected - produced:,.0f} events: {len(jobs)} chunks of {per_chunk:,} "
            f"patients over {DAYS} days, {workers} worker processes"
        )
        with ctx.Pool(workers, initializer=_init_generator, initargs=(counter,)) as pool:
            result = pool.map_async(generate_chunk, jobs)
            while not result.ready():
                result.wait(10)
                done = counter.value
                elapsed = time.perf_counter() - started
                rate = done / elapsed if elapsed else 0.0
                eta = (expected - done) / rate if rate else float("inf")
                say(
                    f"  generated ~{done:,} commands in {elapsed:,.0f} s ({rate:,.0f}/s), "
                    f"ETA {max(0.0, eta):,.0f} s, load {loadavg()}"
                )
            for _index, events, chunk_patients in result.get():
                produced += events
                total_patients += chunk_patients
        files.extend(Path(job[3]) for job in jobs)
        chunks = max(
            1, math.ceil((n_events - produced) * OVERSIZE / EVENTS_PER_PATIENT / per_chunk)
        )
    say(
        f"generated {produced:,} events for {total_patients:,} patients in "
        f"{time.perf_counter() - started:,.0f} s"
    )
    return files, total_patients


def merged(files: Sequence[Path], limit: int) -> Iterator[tuple[int, str]]:
    """(position, body) in recorded-time order across chunks, positions 1..limit."""

    def lines(index: int, path: Path) -> Iterator[tuple[int, int, str]]:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                key, body = line.rstrip("\n").split("\t", 1)
                yield int(key), index, body

    streams = [lines(i, path) for i, path in enumerate(files)]
    for position, (_key, _index, body) in enumerate(heapq.merge(*streams), start=1):
        if position > limit:
            return
        yield position, body


def splice(body: str, position: int) -> bytes:
    """What read_wire returns: the stored body with the position spliced in."""
    return body.replace('"position":null', f'"position":{position}', 1).encode("utf-8")


EVENT_COLUMNS = (
    "row_id",
    "event_id",
    "stream_id",
    "stream_version",
    "event_type",
    "schema_version",
    "occurred_at",
    "recorded_at",
    "actor_id",
    "actor_role",
    "correlation_id",
    "causation_id",
    "policy_id",
    "policy_version",
    "data",
    "body",
)


def load(pg: PgInfo, schema: str, files: Sequence[Path], n_events: int) -> float:
    """COPY the merged log into our tables and eventsourcing's; returns seconds."""
    started = time.perf_counter()
    engine = create_database_engine(pg.url, schema=schema, pool_size=2)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    datastore = PostgresDatastore(
        dbname=pg.dbname,
        host=pg.host,
        port=pg.port,
        user=pg.user,
        password=pg.password,
        schema=schema,
        originator_id_type="text",
    )
    try:
        PostgresApplicationRecorder(datastore, events_table_name=ES_TABLE).create_table()
    finally:
        datastore.close()
    ours_copy = sql.SQL("COPY events ({}) FROM STDIN").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in EVENT_COLUMNS)
    )
    es_copy = sql.SQL(
        "COPY {} (originator_id, originator_version, topic, state, notification_id) FROM STDIN"
    ).format(sql.Identifier(ES_TABLE))
    with (
        pg.connect(schema) as ours,
        pg.connect(schema) as theirs,
        ours.cursor().copy(ours_copy) as ours_rows,
        theirs.cursor().copy(es_copy) as es_rows,
    ):
        es_rows.set_types(["text", "int8", "text", "bytea", "int8"])
        last_report = time.perf_counter()
        for position, body in merged(files, n_events):
            e = orjson.loads(body)
            policy = e["policy"]
            ours_rows.write_row(
                (
                    position,
                    e["event_id"],
                    e["stream_id"],
                    e["stream_version"],
                    e["event_type"],
                    e["schema_version"],
                    e["occurred_at"],
                    e["recorded_at"],
                    e["actor"]["id"],
                    e["actor"]["role"],
                    e["correlation_id"],
                    e["causation_id"],
                    policy["id"] if policy else None,
                    policy["version"] if policy else None,
                    orjson.dumps(e["data"]).decode("utf-8"),
                    body,
                )
            )
            es_rows.write_row(
                (
                    e["stream_id"],
                    e["stream_version"],
                    TOPIC_PREFIX + e["event_type"],
                    splice(body, position),
                    position,
                )
            )
            if time.perf_counter() - last_report > 10:
                last_report = time.perf_counter()
                elapsed = last_report - started
                rate = position / elapsed
                say(
                    f"  loaded {position:,}/{n_events:,} ({rate:,.0f}/s), "
                    f"ETA {(n_events - position) / rate:,.0f} s"
                )
    with pg.connect(schema) as conn:
        loaded = conn.execute("SELECT count(*) FROM events").fetchone()
        if loaded is None or loaded[0] != n_events:
            raise RuntimeError(f"loaded {loaded} events, expected {n_events}")
        say("  numbering event_log, setting sequences, ANALYZE")
        conn.execute("INSERT INTO event_log (position, row_id) SELECT row_id, row_id FROM events")
        conn.execute("SELECT setval(pg_get_serial_sequence('events', 'row_id'), %s)", (n_events,))
        conn.execute(
            "SELECT setval(pg_get_serial_sequence(%s, 'notification_id'), %s)",
            (f"{schema}.{ES_TABLE}", n_events),
        )
        conn.commit()
    with pg.connect(schema, autocommit=True) as conn:
        for table in ("events", "event_log", ES_TABLE):
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    return time.perf_counter() - started


def verify_sample(pg: PgInfo, schema: str, n_events: int, seed: int) -> str:
    """Read a sample back through SqlEventStore.read_wire; it must equal canonical_json of the
    parsed event and eventsourcing's stored state."""
    from continuum.adapters.sql.store import SqlEventStore

    engine = create_database_engine(pg.url, schema=schema, pool_size=2)
    rng = random.Random(seed)
    starts = sorted({0, max(0, n_events - 100), *(rng.randrange(n_events) for _ in range(8))})
    checked = 0
    try:
        store = SqlEventStore(engine)
        head = store.head_position()
        if head != n_events:
            raise AssertionError(f"head position {head}, expected {n_events}")
        with pg.connect(schema) as conn:
            for after in starts:
                page = store.read_wire(after, 100)
                theirs = {
                    int(row[0]): bytes(row[1])
                    for row in conn.execute(
                        sql.SQL(
                            "SELECT notification_id, state FROM {} "
                            "WHERE notification_id > %s ORDER BY notification_id LIMIT 100"
                        ).format(sql.Identifier(ES_TABLE)),
                        (after,),
                    ).fetchall()
                }
                for w in page:
                    event = parse_event(orjson.loads(w.value))
                    if event.position != w.position:
                        raise AssertionError(f"position {w.position}: event says {event.position}")
                    if canonical_json(event) != w.value:
                        raise AssertionError(f"position {w.position}: not canonical JSON")
                    if theirs.get(w.position) != w.value:
                        raise AssertionError(f"position {w.position}: eventsourcing state differs")
                    checked += 1
    finally:
        engine.dispose()
    return (
        f"{checked} events read back via read_wire: equal to canonical_json and to "
        f"eventsourcing's stored state; head position {n_events:,}"
    )


def ensure_dataset(pg: PgInfo, n_events: int, seed: int, workers: int, regenerate: bool) -> str:
    schema = f"bench_proj_{n_events}_{seed}"
    if schema_exists(pg, schema) and not regenerate:
        with pg.connect(schema) as conn:
            try:
                rows = conn.execute("SELECT key, value FROM bench_dataset").fetchall()
                info: dict[str, str] = {str(k): str(v) for k, v in rows}
            except psycopg.errors.UndefinedTable:
                info = {}
        if info.get("complete") == "yes":
            say(
                f"reusing dataset schema {schema}: {info.get('events')} events, "
                f"{info.get('patients')} patients (made {info.get('made_at')}; --regenerate "
                "to rebuild it)"
            )
            return schema
        say(f"dataset schema {schema} is incomplete: rebuilding it")
    drop_schema(pg, schema)
    create_schema(pg, schema)
    with tempfile.TemporaryDirectory(prefix="continuum-bench-proj-") as scratch:
        started = time.perf_counter()
        files, patients = generate(n_events, seed, workers, Path(scratch))
        generated = time.perf_counter() - started
        say(f"loading {n_events:,} events into {schema} (COPY, ours and eventsourcing's)")
        seconds = load(pg, schema, files, n_events)
        say(f"loaded in {seconds:,.0f} s")
    with pg.connect(schema) as conn:
        conn.execute("CREATE TABLE bench_dataset (key text PRIMARY KEY, value text NOT NULL)")
        info = {
            "events": str(n_events),
            "patients": str(patients),
            "seed": str(seed),
            "days": str(DAYS),
            "generate_seconds": f"{generated:.0f}",
            "load_seconds": f"{seconds:.0f}",
            "made_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "complete": "yes",
        }
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO bench_dataset VALUES (%s, %s)", list(info.items()))
        conn.commit()
    return schema


def dataset_facts(pg: PgInfo, schema: str) -> dict[str, Any]:
    with pg.connect(schema) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT stream_id), min(recorded_at), max(recorded_at), "
            "min(occurred_at), max(occurred_at), avg(length(body)) FROM events"
        ).fetchone()
        assert row is not None
        types = conn.execute("SELECT event_type, count(*) FROM events GROUP BY 1").fetchall()
    return {
        "events": int(row[0]),
        "patients": int(row[1]),
        "recorded": (row[2], row[3]),
        "occurred": (row[4], row[5]),
        "body_bytes": float(row[6]),
        "types": {str(k): int(v) for k, v in types},
    }


def progress_printer(label: str, extra: Callable[[], str] = str) -> Callable[[Any], None]:
    """A rebuild's progress callback: a line every 5 s and at the end (`extra()` goes before
    the load average)."""
    last = [time.perf_counter()]

    def show(p: Any) -> None:
        now = time.perf_counter()
        if now - last[0] < 5 and p.position < p.target:
            return
        last[0] = now
        rate = p.rate
        eta = (p.target - p.position) / rate if rate else 0.0
        say(
            f"  {label}: {p.events:,} events, position {p.position:,}/{p.target:,} "
            f"({rate:,.0f}/s), ETA {eta:,.0f} s, {extra()}load {loadavg()}"
        )

    return show


# -- 2. our rebuild (child process) ----------------------------------------------------------------


@dataclass(frozen=True)
class RebuildSpec:
    url: str
    source: str  # the dataset schema
    target: str  # a fresh schema (PostgreSQL) or a SQLite file path
    backend: str = "postgresql"
    tag: str = ""
    max_events: int | None = None
    profile: bool = False


def rebuild_ours(spec: RebuildSpec) -> dict[str, Any]:
    """Child process: replay the whole log into a fresh read model; report rate and memory."""
    os.environ["PGAPPNAME"] = spec.tag
    from continuum.adapters.sql.store import SqlEventStore
    from continuum_projections.readmodel import ReadModel
    from continuum_projections.runners import StoreRunner

    baseline = current_rss_mb()
    pg = PgInfo.of(spec.url)
    source = create_database_engine(spec.url, schema=spec.source, pool_size=2)
    if spec.backend == "sqlite":
        target = create_database_engine(f"sqlite:///{spec.target}")
    else:
        target = create_database_engine(spec.url, schema=spec.target, pool_size=2)
    model = ReadModel(target)
    model.create()
    policies = PolicyRegistry.bundled()
    label = "ours" if spec.backend == "postgresql" else "ours->sqlite"
    progress = progress_printer(label, lambda: f"RSS {current_rss_mb():,.0f} MB, ")

    cpu_before = own_cpu_seconds()
    started = time.perf_counter()
    runner = StoreRunner(SqlEventStore(source), model, policies)
    profiler = cProfile.Profile() if spec.profile else None
    if profiler is not None:
        profiler.enable()
    result = runner.run(on_progress=progress, max_events=spec.max_events)
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - started
    cpu = own_cpu_seconds() - cpu_before
    server = server_cpu_seconds(pg, spec.tag) if spec.tag else 0.0
    out: dict[str, Any] = {
        "events": result.events,
        "skipped": result.skipped,
        "flushes": result.flushes,
        "seconds": seconds,
        "rate": result.events / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "client_cpu": cpu,
        "server_cpu": server,
        "process_cpu": own_cpu_seconds(),
    }
    if profiler is not None:
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.sort_stats("cumulative").print_stats(20)
        buffer.write("\n-- by own time --\n")
        stats.sort_stats("tottime").print_stats(15)
        out["profile"] = buffer.getvalue()
    source.dispose()
    target.dispose()
    return out


# -- 3. eventsourcing's census projection (child process) -------------------------------------


class LogEvent:
    """One of our events as eventsourcing's mapper rebuilds it: the envelope's keys become the
    instance's attributes (the mapper sets `__dict__`), plus originator_id and _version."""

    originator_id: str
    originator_version: int
    event_id: str
    event_type: str
    data: dict[str, Any]


class Entered(LogEvent):
    """PatientAdmitted, PatientReadmitted."""


class Transitioned(LogEvent):
    """LevelTransitioned."""


class Discharged(LogEvent):
    """PatientDischarged."""


class Voided(LogEvent):
    """EventVoided."""


class Recorded(LogEvent):
    """ReassessmentRecorded, AttendanceRecorded: no effect on the census."""


ES_CLASSES: dict[str, type[LogEvent]] = {
    "PatientAdmitted": Entered,
    "PatientReadmitted": Entered,
    "LevelTransitioned": Transitioned,
    "PatientDischarged": Discharged,
    "EventVoided": Voided,
}
for _event_type in EVENT_TYPES:
    _name = _event_type.EVENT_TYPE
    register_topic(TOPIC_PREFIX + _name, ES_CLASSES.get(_name, Recorded))


class ContinuumLog(Application[str]):
    """The upstream application: only its recorder and mapper are used (the runner subscribes
    to its stored events)."""

    name = ES_APP


class CensusView(PostgresTrackingRecorder):
    """The census read model: each patient's level and void undo stack, and patients per level,
    written with the tracking record in one transaction."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        schema = sql.Identifier(self.datastore.schema)
        self.sql_create_statements.extend(
            [
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.es_census_patients (patient_key text PRIMARY "
                    "KEY, level text, undo text NOT NULL)"
                ).format(schema),
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.es_census_levels (level text PRIMARY KEY, "
                    "patients bigint NOT NULL)"
                ).format(schema),
            ]
        )
        self.upsert_patient = sql.SQL(
            "INSERT INTO {}.es_census_patients (patient_key, level, undo) VALUES (%s, %s, %s) "
            "ON CONFLICT (patient_key) DO UPDATE SET level = EXCLUDED.level, undo = EXCLUDED.undo"
        ).format(schema)
        self.add_to_level = sql.SQL(
            "INSERT INTO {0}.es_census_levels AS l (level, patients) VALUES (%s, %s) "
            "ON CONFLICT (level) DO UPDATE SET patients = l.patients + EXCLUDED.patients"
        ).format(schema)
        self.select_levels = sql.SQL(
            "SELECT level, patients FROM {}.es_census_levels WHERE patients <> 0"
        ).format(schema)

    def write(
        self,
        patients: Sequence[tuple[str, str | None, str]],
        deltas: dict[str, int],
        tracking: Tracking,
    ) -> None:
        with self.datastore.transaction(commit=True) as curs:
            if patients:
                curs.executemany(self.upsert_patient, patients)
            changed = [(level, n) for level, n in deltas.items() if n]
            if changed:
                curs.executemany(self.add_to_level, changed)
            self._insert_tracking(curs, tracking)

    def levels(self) -> dict[str, int]:
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self.select_levels)
            return {str(row["level"]): int(row["patients"]) for row in curs.fetchall()}


@dataclass
class EsConfig:
    target: int  # the notification id after which the census is complete
    batch: int | None  # None: one transaction per event
    done: threading.Event = field(default_factory=threading.Event)
    delivered: int = 0  # events handed to the projection up to the target


class CensusProjection(Projection[CensusView]):
    """Active patients by level, folded the way our fold does it (a void undoes the patient's
    latest placement change, if it is the voided event)."""

    name = ES_PROJECTION
    topics: tuple[str, ...] = ()
    config: ClassVar[EsConfig]

    def __init__(self, view: CensusView) -> None:
        super().__init__(view)
        self.levels: dict[str, str | None] = {}
        self.undo: dict[str, list[tuple[str, str | None]]] = {}
        self.dirty: set[str] = set()
        self.deltas: Counter[str] = Counter()
        self.pending = 0
        self.processed = 0

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self._handled(None, tracking)

    @process_event.register
    def entered(self, domain_event: Entered, tracking: Tracking) -> None:
        self._move(domain_event, domain_event.data["placement"]["level"], tracking)

    @process_event.register
    def transitioned(self, domain_event: Transitioned, tracking: Tracking) -> None:
        self._move(domain_event, domain_event.data["placement"]["level"], tracking)

    @process_event.register
    def discharged(self, domain_event: Discharged, tracking: Tracking) -> None:
        self._move(domain_event, None, tracking)

    @process_event.register
    def voided(self, domain_event: Voided, tracking: Tracking) -> None:
        key = domain_event.originator_id
        stack = self.undo.get(key)
        if stack and stack[-1][0] == domain_event.data["voided_event_id"]:
            _, previous = stack.pop()
            self._set_level(key, previous)
            self._handled(key, tracking)
        else:
            self._handled(None, tracking)

    def _move(self, event: LogEvent, level: str | None, tracking: Tracking) -> None:
        key = event.originator_id
        self.undo.setdefault(key, []).append((event.event_id, self.levels.get(key)))
        self._set_level(key, level)
        self._handled(key, tracking)

    def _set_level(self, key: str, level: str | None) -> None:
        old = self.levels.get(key)
        if old is not None:
            self.deltas[old] -= 1
        if level is not None:
            self.deltas[level] += 1
        self.levels[key] = level

    def _handled(self, key: str | None, tracking: Tracking) -> None:
        self.processed += 1
        config = self.config
        if config.batch is None:  # the library's idiom: view and tracking per event
            if key is None:
                self.view.insert_tracking(tracking)
            else:
                self.dirty.add(key)
                self._flush(tracking)
        else:
            if key is not None:
                self.dirty.add(key)
            self.pending += 1
            if self.pending >= config.batch or tracking.notification_id >= config.target:
                self._flush(tracking)
        if tracking.notification_id >= config.target and not config.done.is_set():
            config.delivered = self.processed
            config.done.set()

    def _flush(self, tracking: Tracking) -> None:
        rows = [
            (key, self.levels.get(key), orjson.dumps(self.undo.get(key, [])).decode())
            for key in self.dirty
        ]
        self.view.write(rows, dict(self.deltas), tracking)
        self.dirty.clear()
        self.deltas.clear()
        self.pending = 0


@dataclass(frozen=True)
class EsSpec:
    url: str
    source: str
    view_schema: str
    label: str
    filtered: bool
    batch: int | None
    limit: int  # process the log up to this notification id
    tag: str = ""


def rebuild_es(spec: EsSpec) -> dict[str, Any]:
    """Child process: eventsourcing's ProjectionRunner builds the census from its stored
    events into a fresh schema; report rate and memory."""
    os.environ["PGAPPNAME"] = spec.tag
    baseline = current_rss_mb()
    pg = PgInfo.of(spec.url)
    topics = tuple(TOPIC_PREFIX + t for t in CENSUS_EVENT_TYPES) if spec.filtered else ()
    with pg.connect(spec.source) as conn:
        where = "notification_id <= %s" + (" AND topic = ANY(%s)" if topics else "")
        params: list[Any] = [spec.limit, list(topics)] if topics else [spec.limit]
        query = sql.SQL("SELECT max(notification_id), count(*) FROM {} WHERE " + where)
        row = conn.execute(query.format(sql.Identifier(ES_TABLE)), params).fetchone()
    assert row is not None and row[0] is not None
    target, delivered = int(row[0]), int(row[1])
    config = EsConfig(target=target, batch=spec.batch)
    projection_class = cast(
        type[CensusProjection],
        type("EsCensus", (CensusProjection,), {"name": ES_PROJECTION, "topics": topics}),
    )
    projection_class.config = config
    env = pg.es_env(spec.source)
    env[f"{ES_PROJECTION.upper()}_POSTGRES_SCHEMA"] = spec.view_schema
    cpu_before = own_cpu_seconds()
    started = time.perf_counter()
    with ProjectionRunner(
        application_class=ContinuumLog,
        projection_class=projection_class,
        view_class=CensusView,
        env=env,
    ) as runner:
        last = time.perf_counter()
        while not config.done.wait(1.0):
            if runner.is_interrupted.is_set():
                runner.run_forever(timeout=0)  # re-raises the processing thread's error
                raise RuntimeError("the projection runner stopped before the end of the log")
            if time.perf_counter() - last >= 5:
                last = time.perf_counter()
                done = cast(CensusProjection, runner.projection).processed
                rate = done / (last - started)
                say(
                    f"  {spec.label}: {done:,}/{delivered:,} events delivered "
                    f"({rate:,.0f}/s), ETA {(delivered - done) / rate if rate else 0:,.0f} s, "
                    f"RSS {current_rss_mb():,.0f} MB, load {loadavg()}"
                )
        seconds = time.perf_counter() - started
        cpu = own_cpu_seconds() - cpu_before
        server = server_cpu_seconds(pg, spec.tag) if spec.tag else 0.0
        tracked = runner.projection.view.max_tracking_id(ES_APP)
        levels = runner.projection.view.levels()
    if tracked is None or tracked < target:
        raise AssertionError(f"{spec.label}: tracking at {tracked}, expected {target}")
    return {
        "events": spec.limit,  # log events covered (the filtered runs are delivered fewer)
        "delivered": config.delivered,
        "seconds": seconds,
        "rate": spec.limit / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "client_cpu": cpu,
        "server_cpu": server,
        "process_cpu": own_cpu_seconds(),
        "levels": levels,
    }


# -- running children ------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    result: dict[str, Any]
    wall: float
    others: float | None  # cores used by anything else during the child's life

    def __getitem__(self, key: str) -> Any:
        return self.result[key]


def in_child(label: str, fn: Callable[[Any], dict[str, Any]], spec: Any) -> Run:
    """Run `fn(spec)` in a fresh `spawn` process; measure the machine's CPU around it."""
    ctx = mp.get_context("spawn")
    machine = machine_cpu_seconds()
    started = time.perf_counter()
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        result = pool.apply(fn, (spec,))
    wall = time.perf_counter() - started
    after = machine_cpu_seconds()
    others = None
    if machine is not None and after is not None:
        ours = result["process_cpu"] + result["server_cpu"]
        others = max(0.0, (after - machine) - ours) / wall
    run = Run(label, result, wall, others)
    say(
        f"{label}: {result['events']:,} events in {result['seconds']:,.1f} s = "
        f"{result['rate']:,.0f} events/s, peak RSS {result['peak_rss_mb']:,.0f} MB "
        f"(after imports {result['baseline_rss_mb']:,.0f} MB), CPU client "
        f"{result['client_cpu']:,.1f} s + server {result['server_cpu']:,.1f} s, others "
        f"{'?' if others is None else f'{others:.2f}'} cores"
    )
    return run


# -- 3b. our rebuild in several processes (continuum_projections.parallel) --------------------


def rebuild_parallel(
    url: str, source: str, target: str, workers: int, until: int, batch: int
) -> Run:
    """`parallel.rebuild` with `workers` shard processes, started from this process (a pool's
    worker may not start processes). Peak RSS is the largest shard's (VmHWM, read at each
    progress report), and in place of "after imports" the shards' sum; client CPU is the
    shards' and the coordinator's; server CPU is the rest of the machine's CPU meanwhile (so
    it includes anything else running)."""
    from continuum_projections.parallel import rebuild
    from continuum_projections.runners import Progress

    label = f"ours, {workers} processes ({batch:,}-event batches)"
    peaks: dict[int, float] = {}  # shard pid -> VmHWM MB, read at each progress report
    show = progress_printer(label)

    def progress(p: Progress) -> None:
        for child in mp.active_children():
            if child.name.startswith("rebuild-shard-") and child.pid is not None:
                with contextlib.suppress(OSError, ValueError):
                    for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peaks[child.pid] = int(line.split()[1]) / 1024
        show(p)

    opener = functools.partial(open_rebuild_parts, url, source, target)
    machine = machine_cpu_seconds()
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = rebuild(opener, workers, until=until, on_progress=progress, flush_every=batch)
    seconds = time.perf_counter() - started
    after_machine = machine_cpu_seconds()
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = sum(
        (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)
        for a, b in ((own, own_after), (children, children_after))
    )
    total = (after_machine - machine) if machine is not None and after_machine else 0.0
    result = {
        "events": done.events,
        "seconds": seconds,
        "rate": done.events / seconds,
        "peak_rss_mb": max(peaks.values(), default=float("nan")),
        "baseline_rss_mb": sum(peaks.values()),
        "client_cpu": client,
        "server_cpu": max(0.0, total - client),
        "process_cpu": client,
    }
    say(
        f"{label}: {done.events:,} events in {seconds:,.1f} s = {result['rate']:,.0f} events/s, "
        f"largest shard's peak RSS {result['peak_rss_mb']:,.0f} MB (all shards "
        f"{result['baseline_rss_mb']:,.0f} MB), CPU client {client:,.1f} s "
        f"+ server and others {result['server_cpu']:,.1f} s"
    )
    return Run(label, result, seconds, None)


# -- 4. as-of queries -----------------------------------------------------------------------------


def as_of_latencies(
    engine: Engine,
    span: tuple[dt.datetime, dt.datetime],
    moments: int,
    seed: int,
    query: Callable[[Any, dt.datetime], Any],
) -> list[float]:
    rng = random.Random(seed)
    start, end = span
    times: list[float] = []
    with engine.connect() as conn:
        for _ in range(moments):
            moment = start + (end - start) * rng.random()
            began = time.perf_counter()
            query(conn, moment)
            times.append(time.perf_counter() - began)
            conn.rollback()
    return times


def quantile_ms(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# -- reporting ------------------------------------------------------------------------------------


def describe_postgres(pg: PgInfo) -> str:
    with pg.connect(autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        names = ("shared_buffers", "work_mem", "synchronous_commit", "fsync")
        shown = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
            for name in names
        }
    settings = ", ".join(f"{k}={v[0] if v else '?'}" for k, v in shown.items())
    return f"PostgreSQL {version[0] if version else '?'}: {settings}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str], align: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Projection rebuild (ours vs eventsourcing) and census-as-of latency."
    )
    parser.add_argument("--events", type=int, default=None, help="log size (default 1,000,000)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EVENTS:,} events")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--regenerate", action="store_true", help="rebuild the cached dataset")
    parser.add_argument("--workers", type=int, default=2, help="generator processes")
    parser.add_argument("--sqlite", action="store_true", help="also rebuild into SQLite")
    parser.add_argument("--skip-es", action="store_true", help="skip the eventsourcing runs")
    parser.add_argument(
        "--shards",
        type=int,
        default=2,
        help="also rebuild with continuum_projections.parallel in this many processes "
        "(default 2, one per core here; 1 skips it)",
    )
    parser.add_argument(
        "--shard-batch",
        type=int,
        default=SHARD_BATCH,
        help=f"events per batch in each shard of the parallel run (default {SHARD_BATCH:,}, "
        "as `replay --workers`)",
    )
    parser.add_argument(
        "--es-per-event-events",
        type=int,
        default=50_000,
        help="log events for eventsourcing's one-transaction-per-event run (default 50,000)",
    )
    parser.add_argument("--moments", type=int, default=DEFAULT_MOMENTS)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile our rebuild (cProfile, in another child process)",
    )
    parser.add_argument(
        "--profile-events",
        type=int,
        default=None,
        help="events applied in the profiled rebuild (default: all)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the rebuilt read models")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("CONTINUUM_TEST_DATABASE_URL", DEFAULT_PG_URL),
        help="PostgreSQL database (default $CONTINUUM_TEST_DATABASE_URL or the local "
        "continuum_test)",
    )
    args = parser.parse_args(argv)
    n_events = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
    pg = PgInfo.of(args.pg_url)
    run_id = uuid.uuid4().hex[:8]

    print(
        f"{n_events:,} events, seed {args.seed}; {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}; load average {loadavg()}",
        flush=True,
    )
    print(describe_postgres(pg), flush=True)
    source = ensure_dataset(pg, n_events, args.seed, args.workers, args.regenerate)
    say("checking the dataset")
    print(verify_sample(pg, source, n_events, args.seed), flush=True)
    facts = dataset_facts(pg, source)
    print(
        f"dataset {source}: {facts['events']:,} events, {facts['patients']:,} patients, "
        f"recorded {facts['recorded'][0]:%Y-%m-%d} .. {facts['recorded'][1]:%Y-%m-%d}, "
        f"mean body {facts['body_bytes']:,.0f} B; "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(facts["types"].items())),
        flush=True,
    )

    runs: list[Run] = []
    created: list[str] = []
    rm_schema = f"bench_rm_{run_id}"
    create_schema(pg, rm_schema)
    created.append(rm_schema)
    scratch = tempfile.TemporaryDirectory(prefix="continuum-bench-proj-")
    try:
        say(f"rebuilding our read models into {rm_schema} (load {loadavg()})")
        ours = in_child(
            "ours", rebuild_ours, RebuildSpec(pg.url, source, rm_schema, tag=f"bench-{run_id}-cc")
        )
        runs.append(ours)
        parallel_schema = None
        parallel: Run | None = None
        if args.shards > 1:
            parallel_schema = f"bench_rmpar_{run_id}"
            create_schema(pg, parallel_schema)
            created.append(parallel_schema)
            say(f"rebuilding in {args.shards} processes into {parallel_schema}")
            parallel = rebuild_parallel(
                pg.url, source, parallel_schema, args.shards, n_events, args.shard_batch
            )
            runs.append(parallel)
        if args.sqlite:
            path = str(Path(scratch.name) / "readmodel.sqlite3")
            say(f"rebuilding our read models into SQLite {path}")
            runs.append(
                in_child(
                    "ours -> SQLite",
                    rebuild_ours,
                    RebuildSpec(pg.url, source, path, backend="sqlite", tag=f"bench-{run_id}-sq"),
                )
            )
        es_runs: list[Run] = []
        if not args.skip_es:
            configs = [
                ("es batched", True, FLUSH_EVERY, n_events),
                ("es batched, all topics", False, FLUSH_EVERY, n_events),
                ("es per event", True, None, min(n_events, args.es_per_event_events)),
            ]
            for i, (label, filtered, batch, limit) in enumerate(configs):
                view_schema = f"bench_esv_{run_id}_{i}"
                create_schema(pg, view_schema)
                created.append(view_schema)
                say(f"{label}: eventsourcing ProjectionRunner into {view_schema}")
                spec = EsSpec(
                    pg.url, source, view_schema, label, filtered, batch, limit, f"bench-{run_id}-es"
                )
                es_runs.append(in_child(label, rebuild_es, spec))
            runs.extend(es_runs)

        # The census must be the same whichever library built it.
        from continuum_projections import reports

        rm_engine = create_database_engine(pg.url, schema=rm_schema, pool_size=2)
        try:
            with rm_engine.connect() as conn:
                census = reports.current_census(conn)
                ours_levels = {k: v for k, v in census.levels().items() if v}
                latest = reports.census_as_of(conn, facts["recorded"][1])
            checks = [f"our census: {census.total:,} active patients"]
            if parallel_schema is not None:
                from continuum_projections.compare import diff_read_models

                par_engine = create_database_engine(pg.url, schema=parallel_schema, pool_size=2)
                try:
                    differences = diff_read_models(rm_engine, par_engine)
                finally:
                    par_engine.dispose()
                if differences:
                    raise AssertionError(
                        f"the {args.shards}-process rebuild differs: {differences[:5]}"
                    )
                checks.append(f"{args.shards}-process read model == one-process read model")
            if {k: v for k, v in latest.levels().items() if v} != ours_levels:
                raise AssertionError("census as of the last recorded time != current census")
            checks.append("census_as_of(last recorded time) == current census")
            for run in es_runs:
                if run["events"] == n_events:
                    if run["levels"] != ours_levels:
                        raise AssertionError(
                            f"{run.label} census {run['levels']} != ours {ours_levels}"
                        )
                    checks.append(f"{run.label} census == ours")
            print("checks: " + "; ".join(checks), flush=True)

            say(f"as-of queries: {args.moments} recorded times, {args.moments} clinical times")
            recorded = as_of_latencies(
                rm_engine, facts["recorded"], args.moments, args.seed, reports.census_as_of
            )
            clinical = as_of_latencies(
                rm_engine, facts["occurred"], args.moments, args.seed + 1, reports.census_in_care_at
            )
            with rm_engine.connect() as conn:
                sizes = {
                    name: int(conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one())
                    for name in (
                        "rm_patients",
                        "rm_stays",
                        "rm_episodes",
                        "rm_transitions",
                        "rm_census_deltas",
                        "rm_census_boundaries",
                    )
                }
        finally:
            rm_engine.dispose()
        print("read model rows: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()), flush=True)

        profile_text = None
        if args.profile:
            profile_schema = f"bench_rmp_{run_id}"
            create_schema(pg, profile_schema)
            created.append(profile_schema)
            say("profiling our rebuild (cProfile)")
            profiled = in_child(
                "ours, profiled",
                rebuild_ours,
                RebuildSpec(
                    pg.url,
                    source,
                    profile_schema,
                    tag=f"bench-{run_id}-pr",
                    max_events=args.profile_events,
                    profile=True,
                ),
            )
            profile_text = profiled["profile"]
    finally:
        scratch.cleanup()
        if not args.keep:
            for schema in created:
                drop_schema(pg, schema)

    # -- summary ------------------------------------------------------------------------------
    print()
    rows = []
    for run in runs:
        delivered = run.result.get("delivered")
        rows.append(
            [
                run.label,
                f"{run['events']:,}" + (f" ({delivered:,} delivered)" if delivered else ""),
                f"{run['seconds']:,.1f}",
                f"{run['rate']:,.0f}",
                f"{run['peak_rss_mb']:,.0f} ({run['baseline_rss_mb']:,.0f})",
                f"{run['client_cpu']:,.1f}",
                f"{run['server_cpu']:,.1f}",
                "?" if run.others is None else f"{run.others:.2f}",
            ]
        )
    print(
        table(
            rows,
            [
                "rebuild",
                "log events",
                "seconds",
                "events/s",
                "peak RSS MB (after imports)",
                "client CPU s",
                "server CPU s",
                "others, cores",
            ],
            ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"],
        )
    )
    if len(runs) > 1:
        print()
        for run in runs[1:]:
            if run.label.startswith("es"):
                print(f"ours / {run.label}: {ours['rate'] / run['rate']:.2f}x events/s")
    print()
    latency_rows = [
        [
            name,
            str(len(values)),
            f"{quantile_ms(values, 0.5):.1f}",
            f"{quantile_ms(values, 0.99):.1f}",
            f"{max(values) * 1000:.1f}",
        ]
        for name, values in (
            ("census_as_of (recorded time)", recorded),
            ("census_in_care_at (clinical time)", clinical),
        )
    ]
    print(table(latency_rows, ["query", "n", "p50 ms", "p99 ms", "max ms"], ["---", *["---:"] * 4]))
    print()
    worst = max(*recorded, *clinical) * 1000

    def rate_verdict(name: str, run: Run) -> tuple[str, bool, str]:
        rate = run["rate"]
        target = TARGETS["events_per_s"]
        return name, rate >= target, f"{rate:,.0f}/s ({rate / target:.0%} of target)"

    verdicts = [
        rate_verdict("rebuild >= 50,000 events/s", ours),
        (
            "peak RSS < 500 MB",
            ours["peak_rss_mb"] < TARGETS["peak_rss_mb"],
            f"{ours['peak_rss_mb']:,.0f} MB",
        ),
        ("as-of < 200 ms", worst < TARGETS["as_of_ms"], f"max {worst:,.1f} ms"),
    ]
    if parallel is not None:  # the same targets for `replay --workers N`, its memory summed
        verdicts[2:2] = [
            rate_verdict(f"rebuild >= 50,000 events/s, {args.shards} processes", parallel),
            (
                f"peak RSS < 500 MB, {args.shards} processes together",
                parallel["baseline_rss_mb"] < TARGETS["peak_rss_mb"],
                f"{parallel['baseline_rss_mb']:,.0f} MB; "
                f"{parallel['peak_rss_mb']:,.0f} MB the largest",
            ),
        ]
    for name, met, figure in verdicts:
        print(f"target {name}: {'met' if met else 'MISSED'} ({figure})")
    print(f"load average at the end: {loadavg()}")
    if profile_text:
        print()
        print("cProfile of our rebuild (top 20 by cumulative time):")
        print(profile_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
