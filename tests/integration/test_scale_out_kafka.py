"""Projection workers scale out as one Kafka consumer group, against a real broker.

A simulated cohort's events are relayed (the real `Relay` and `KafkaPublisher`) to a topic of
6 partitions. One `continuum project --source kafka` process builds a reference read model.
Then three `continuum project --source kafka --follow` processes of another group share the
partitions and write ONE read model (a SQLite file all of them open); one is killed with
SIGKILL mid-way, and a fourth joins later. The shared read model must end exactly equal to the
reference: every table `compare.diff_read_models` compares, the census now and as of many
past moments, the audit trail. Killing and joining each move partitions between processes;
a lost event or one counted twice would show as a difference.

The workers are separate OS processes (the real CLI), as operators would run them.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from sqlalchemy import Engine

from continuum.adapters.kafka.publisher import KafkaPublisher
from continuum.adapters.memory import InMemoryCheckpoints, InMemoryEventStore
from continuum.adapters.sql.database import create_database_engine
from continuum.application.relay import Relay
from continuum.application.service import PatientService
from continuum.domain.policy import PolicyRegistry
from continuum.simulation.cohort import simulate_cohort
from continuum_projections import reports
from continuum_projections.compare import diff_read_models
from continuum_projections.readmodel import ReadModel
from continuum_projections.runners import StoreRunner, kafka_checkpoint
from tests.integration.test_relay_kafka import settings_for
from tests.kafka_broker import BrokerInfo, consume_all, create_topic
from tests.kafka_broker import unique_name as unique
from tests.support import FixedClock

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 6
PATIENTS = 400
DAYS = 120
START = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
#: Small batches, so that the workers take a while and every rebalance lands mid-way (a joiner
#: needs a few seconds to start and join; with 10-event batches the survivors could finish
#: first once late census deltas were written in one statement).
FLUSH_EVERY = 2
HANG_GUARD_S = 240.0


class Ticking(FixedClock):
    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(minutes=20)
        return self.now


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    stdout: IO[bytes]
    stderr: IO[bytes]
    out_path: Path
    err_path: Path

    def stop(self) -> tuple[int, str]:
        """SIGTERM: finish the batch in hand, leave the group, print the summary."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(60)

    def wait(self, timeout_s: float) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=30)
        self.stdout.close()
        self.stderr.close()
        return code, self.out_path.read_text(encoding="utf-8", errors="replace")

    def errors(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")[-3000:]


def _env(broker: BrokerInfo, events_db: Path, read_model: Path) -> dict[str, str]:
    return {
        **os.environ,
        **broker.settings_env(),
        "CONTINUUM_DATABASE_URL": f"sqlite:///{events_db}",
        "CONTINUUM_READ_MODEL_URL": f"sqlite:///{read_model}",
        "CONTINUUM_KAFKA_CONNECT_TIMEOUT_MS": "15000",
    }


def _start(name: str, env: dict[str, str], topic: str, group: str, tmp: Path) -> Worker:
    args = [
        sys.executable,
        "-m",
        "continuum.entrypoints.cli",
        "project",
        "--source=kafka",
        f"--topic={topic}",
        f"--group={group}",
        f"--flush-every={FLUSH_EVERY}",
        "--follow",
    ]
    out_path, err_path = tmp / f"{name}.out", tmp / f"{name}.err"
    stdout, stderr = out_path.open("wb"), err_path.open("wb")
    proc = subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr)
    return Worker(name, proc, stdout, stderr, out_path, err_path)


def _projected(summary: str) -> int:
    found = re.search(r"projected (\d+) events", summary)
    assert found, summary
    return int(found.group(1))


def _done(model: ReadModel, topic: str) -> int:
    """Messages projected into `model`, by its saved offsets (all partitions)."""
    return sum(model.checkpoints_like(f"kafka:{topic}:").values())


def _wait_for(
    what: str, condition: Callable[[], bool], workers: list[Worker], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for worker in workers:
            assert worker.proc.poll() is None, f"{worker.name} exited:\n{worker.errors()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def open_model() -> Iterator[Callable[[Path], ReadModel]]:
    engines: list[Engine] = []

    def open_at(path: Path) -> ReadModel:
        engine = create_database_engine(f"sqlite:///{path}")
        engines.append(engine)
        model = ReadModel(engine)
        model.create()
        return model

    yield open_at
    for engine in engines:
        engine.dispose()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:  # whatever the test did, leave no process behind
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=30)
        worker.stdout.close()
        worker.stderr.close()


def test_workers_share_partitions_and_lose_or_double_count_nothing(
    policies: PolicyRegistry,
    kafka_broker: BrokerInfo,
    tmp_path: Path,
    workers: list[Worker],
    open_model: Callable[[Path], ReadModel],
) -> None:
    # The log: a simulated cohort through the real service, relayed by the real relay.
    store = InMemoryEventStore()
    simulate_cohort(
        PatientService(store, policies, Ticking(START)), patients=PATIENTS, days=DAYS, seed=17
    )
    head = store.head_position()
    topic = create_topic(kafka_broker.bootstrap_servers, unique("events"), PARTITIONS)
    settings = settings_for(kafka_broker.bootstrap_servers, kafka_broker)
    publisher = KafkaPublisher(settings, topic)
    try:
        assert (
            Relay(store, InMemoryCheckpoints(), publisher, name="r", batch_size=500).drain() == head
        )
    finally:
        publisher.close()
    records = consume_all(kafka_broker.bootstrap_servers, topic, expected_count=head, timeout=60)
    ends: dict[str, int] = {}
    for record in records:
        name = kafka_checkpoint(topic, record.partition)
        ends[name] = max(ends.get(name, 0), record.offset + 1)
    assert len(records) == head and len(ends) == PARTITIONS  # every partition holds events
    total = sum(ends.values())

    events_db = tmp_path / "events.sqlite3"  # the CLI's own store: unused by a Kafka worker
    from_store = open_model(tmp_path / "store.sqlite3")
    StoreRunner(store, from_store, policies).run()

    # One worker: the reference. (Followed until every partition is done rather than run with
    # until_end: Tansu's end_offsets are short of the real end, see tests/kafka_broker.py.)
    reference_db = tmp_path / "one-worker.sqlite3"
    env = _env(kafka_broker, events_db, reference_db)
    one = _start("one", env, topic, unique("g1"), tmp_path)
    workers.append(one)
    reference = open_model(reference_db)
    _wait_for(
        "the one worker to finish",
        lambda: reference.checkpoints_like(f"kafka:{topic}:") == ends,
        [one],
        HANG_GUARD_S,
    )
    code, summary = one.stop()
    assert code == 0, one.errors()
    assert _projected(summary) == head
    assert diff_read_models(from_store.engine, reference.engine) == []

    # Three workers of one group into one read model; one killed mid-way, one joining later.
    shared_db = tmp_path / "shared.sqlite3"
    env = _env(kafka_broker, events_db, shared_db)
    group = unique("g3")
    trio = [_start(f"w{i}", env, topic, group, tmp_path) for i in (1, 2, 3)]
    workers.extend(trio)
    shared = open_model(shared_db)
    _wait_for("a fifth projected", lambda: _done(shared, topic) >= total // 5, trio, 120)
    trio[0].proc.send_signal(signal.SIGKILL)
    trio[0].proc.wait(timeout=30)
    at_kill = _done(shared, topic)
    assert at_kill < total, "the kill landed after the end: make the cohort bigger"
    survivors = trio[1:]
    _wait_for(
        "survivors to go on",
        lambda: _done(shared, topic) >= at_kill + total // 20,
        survivors,
        120,
    )
    joiner = _start("w4", env, topic, group, tmp_path)
    workers.append(joiner)
    at_join = _done(shared, topic)
    assert at_join < total, "the join came after the end: make the cohort bigger"
    _wait_for(
        "every partition projected",
        lambda: shared.checkpoints_like(f"kafka:{topic}:") == ends,
        [*survivors, joiner],
        HANG_GUARD_S,
    )
    counted: dict[str, int] = {}
    for worker in [*survivors, joiner]:
        code, summary = worker.stop()
        assert code == 0, worker.errors()
        counted[worker.name] = _projected(summary)
    # The killed worker's committed batches stayed (the others did not redo them); the
    # joiner took partitions over (it projected events of its own).
    assert sum(counted.values()) < head, (counted, head)
    assert counted["w4"] > 0, counted

    assert diff_read_models(reference.engine, shared.engine) == []
    with reference.engine.connect() as a, shared.engine.connect() as b:
        assert reports.current_census(a).counts == reports.current_census(b).counts
        assert reports.current_census(b).total > 0
        for day in range(0, DAYS + 1, 3):
            moment = START + dt.timedelta(days=day, hours=7)
            assert (
                reports.census_as_of(a, moment).counts == reports.census_as_of(b, moment).counts
            ), moment
        assert reports.audit_trail(a) == reports.audit_trail(b)
