"""The Kafka runner against a real Kafka-protocol broker: from the same log, the store runner
and the Kafka runner (a consumer group member) build identical read models, also when the topic
holds duplicates from a relay re-send, also as of a past moment, and a Kafka runner stopped
half-way resumes from the offsets saved with its rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from continuum.adapters.kafka import clients
from continuum.adapters.kafka.publisher import KafkaPublisher
from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.store import SqlCheckpoints, SqlEventStore
from continuum.application.relay import Relay
from continuum.application.service import PatientService
from continuum.domain.policy import PolicyRegistry
from continuum.settings import Settings
from continuum.simulation.cohort import simulate_cohort
from continuum_projections import reports
from continuum_projections.compare import diff_read_models
from continuum_projections.readmodel import ReadModel
from continuum_projections.runners import KafkaRunner, StoreRunner
from tests.integration.test_relay_kafka import settings_for
from tests.kafka_broker import BrokerInfo, consume_all, create_topic
from tests.kafka_broker import unique_name as unique
from tests.support import FixedClock

pytestmark = pytest.mark.kafka


class Ticking(FixedClock):
    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(minutes=20)
        return self.now


def _cohort(engine: Engine, policies: PolicyRegistry) -> SqlEventStore:
    store = SqlEventStore(engine)
    clock = Ticking(dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=50, days=100, seed=31)
    return store


def _relay(store: SqlEventStore, engine: Engine, settings: Settings, topic: str, name: str) -> int:
    publisher = KafkaPublisher(settings, topic)
    try:
        return Relay(store, SqlCheckpoints(engine), publisher, name=name, batch_size=500).drain()
    finally:
        publisher.close()


def _model(path: Path) -> ReadModel:
    model = ReadModel(create_database_engine(f"sqlite:///{path}"))
    model.create()
    return model


def _kafka_run(
    settings: Settings,
    topic: str,
    model: ReadModel,
    policies: PolicyRegistry,
    *,
    group: str,
    as_of: dt.datetime | None = None,
    max_batches: int | None = None,
) -> tuple[KafkaRunner, int]:
    """Run a Kafka runner; return it and the lag it reports when it stops."""
    consumer = clients.consumer(settings, group=group, max_poll_records=200)
    try:
        runner = KafkaRunner(consumer, topic, model, policies, as_of=as_of, flush_every=200)
        runner.run(until_end=max_batches is None, max_batches=max_batches, idle_timeout_s=60)
        return runner, sum(runner.lag().values())
    finally:
        consumer.close()


def test_store_and_kafka_runners_build_identical_read_models(
    sqlite_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    store = _cohort(sqlite_engine, policies)
    head = store.head_position()
    topic = create_topic(kafka_broker.bootstrap_servers, unique("events"), partitions=3)
    settings = settings_for(kafka_broker.bootstrap_servers, kafka_broker)
    assert _relay(store, sqlite_engine, settings, topic, "r1") == head
    # A relay that lost its checkpoint re-sends a stretch: byte-identical duplicates.
    assert _relay(store, sqlite_engine, settings, topic, "r2") == head
    on_topic = consume_all(kafka_broker.bootstrap_servers, topic, expected_count=2 * head)
    assert len(on_topic) == 2 * head

    from_store = _model(tmp_path / "store.sqlite3")
    StoreRunner(store, from_store, policies).run()

    from_kafka = _model(tmp_path / "kafka.sqlite3")
    # Stop after two batches, then resume in a new consumer of the same group.
    first, lag = _kafka_run(settings, topic, from_kafka, policies, group="g1", max_batches=2)
    assert lag > 0
    assert 0 < first.progress.events < head
    saved = from_kafka.checkpoints_like(f"kafka:{topic}:")
    assert saved and sum(saved.values()) < 2 * head
    second, lag = _kafka_run(settings, topic, from_kafka, policies, group="g1")
    assert first.progress.events + second.progress.events == head
    assert second.fold.duplicates + first.fold.duplicates == head  # every re-sent copy skipped
    assert lag == 0

    assert diff_read_models(from_store.engine, from_kafka.engine) == []
    moment = dt.datetime(2026, 3, 1, tzinfo=dt.UTC) + dt.timedelta(days=20)
    with from_store.engine.connect() as a, from_kafka.engine.connect() as b:
        assert reports.current_census(a).counts == reports.current_census(b).counts
        assert reports.census_as_of(a, moment).counts == reports.census_as_of(b, moment).counts
        assert reports.audit_trail(a) == reports.audit_trail(b)


def test_records_not_keyed_by_patient_fold_the_same(
    sqlite_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    """The runner loads saved state by the records' keys; a record without a key, or with
    another, is still folded (its patient is looked up on its own)."""
    store = _cohort(sqlite_engine, policies)
    head = store.head_position()
    topic = create_topic(kafka_broker.bootstrap_servers, unique("unkeyed"), partitions=1)
    settings = settings_for(kafka_broker.bootstrap_servers, kafka_broker)
    producer = clients.producer(settings)
    try:
        for i, wire in enumerate(store.read_wire(0, head)):
            key = None if i % 2 else b"not-a-patient"
            producer.send(topic, key=key, value=wire.value)
        producer.flush()
    finally:
        producer.close()
    from_store = _model(tmp_path / "store.sqlite3")
    StoreRunner(store, from_store, policies).run()
    from_kafka = _model(tmp_path / "kafka.sqlite3")
    runner, lag = _kafka_run(settings, topic, from_kafka, policies, group="g-unkeyed")
    assert (runner.progress.events, lag) == (head, 0)
    assert diff_read_models(from_store.engine, from_kafka.engine) == []


def test_kafka_replay_as_of_uses_recorded_time(
    sqlite_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    store = _cohort(sqlite_engine, policies)
    topic = create_topic(kafka_broker.bootstrap_servers, unique("events"), partitions=2)
    settings = settings_for(kafka_broker.bootstrap_servers, kafka_broker)
    _relay(store, sqlite_engine, settings, topic, "r")
    moment = dt.datetime(2026, 3, 1, tzinfo=dt.UTC) + dt.timedelta(days=3, hours=5)

    by_store = _model(tmp_path / "s.sqlite3")
    StoreRunner(store, by_store, policies, as_of=moment).run()
    by_kafka = _model(tmp_path / "k.sqlite3")
    runner, _ = _kafka_run(settings, topic, by_kafka, policies, group=unique("g"), as_of=moment)
    assert runner.progress.skipped > 0
    assert diff_read_models(by_store.engine, by_kafka.engine) == []
    with by_kafka.engine.connect() as conn:
        replayed = reports.current_census(conn).counts
    live = _model(tmp_path / "live.sqlite3")
    StoreRunner(store, live, policies).run()
    with live.engine.connect() as conn:
        assert reports.census_as_of(conn, moment).counts == replayed


def _topic_and_reference(
    engine: Engine, policies: PolicyRegistry, broker: BrokerInfo, tmp: Path, *, partitions: int
) -> tuple[int, str, Settings, ReadModel]:
    """A cohort relayed to a new topic, and the store runner's read model of it."""
    store = _cohort(engine, policies)
    head = store.head_position()
    topic = create_topic(broker.bootstrap_servers, unique("events"), partitions=partitions)
    settings = settings_for(broker.bootstrap_servers, broker)
    assert _relay(store, engine, settings, topic, "r") == head
    from_store = _model(tmp / "store.sqlite3")
    StoreRunner(store, from_store, policies).run()
    return head, topic, settings, from_store


@pytest.mark.postgres
def test_kafka_runner_into_postgresql_overlaps_writes_and_recovers_from_a_failed_batch(
    sqlite_engine: Engine,
    policies: PolicyRegistry,
    kafka_broker: BrokerInfo,
    tmp_path: Path,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On PostgreSQL a batch is written by the writer thread while the next poll is folded.
    When a batch in flight fails, the runner stops with the error, nothing of that batch is
    saved, and a new member of the group finishes into exactly the store runner's model."""
    from tests.support import fresh_pg_schema

    head, topic, settings, from_store = _topic_and_reference(
        sqlite_engine, policies, kafka_broker, tmp_path, partitions=3
    )
    with fresh_pg_schema(pg_url, migrate=False, prefix="kafkarm") as engine:
        model = ReadModel(engine)
        model.create()
        original = ReadModel.write
        calls: list[int] = []

        def third_write_fails(self: ReadModel, *args: Any, **options: Any) -> None:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("disk full (injected)")
            original(self, *args, **options)

        monkeypatch.setattr(ReadModel, "write", third_write_fails)
        with pytest.raises(RuntimeError, match="disk full"):
            _kafka_run(settings, topic, model, policies, group="pg")
        saved = sum(model.checkpoints_like(f"kafka:{topic}:").values())
        assert 0 < saved < head  # two batches saved, the failed one not

        monkeypatch.setattr(ReadModel, "write", original)
        runner, lag = _kafka_run(settings, topic, model, policies, group="pg")
        assert lag == 0
        assert runner.fold.duplicates == 0  # resumed exactly after the last saved batch
        assert runner.progress.events == head - saved
        assert diff_read_models(from_store.engine, engine) == []


@pytest.mark.postgres
def test_a_fenced_kafka_runner_drops_its_stale_batch_and_counts_nothing_twice(
    sqlite_engine: Engine,
    policies: PolicyRegistry,
    kafka_broker: BrokerInfo,
    tmp_path: Path,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker A stalls with its second batch in flight; meanwhile worker B (as the group
    would after A's session expired) projects the rest of the topic into the same read model.
    A's batch must not land (every event in it would count twice): the read model refuses it
    (StaleBatch), A drops its memory, seeks to the saved offsets, finds nothing left, and the
    model equals the store runner's."""
    from tests.support import fresh_pg_schema

    head, topic, settings, from_store = _topic_and_reference(
        sqlite_engine, policies, kafka_broker, tmp_path, partitions=2
    )
    with fresh_pg_schema(pg_url, migrate=False, prefix="fence") as engine:
        model_a = ReadModel(engine)
        model_a.create()
        with engine.connect() as conn:
            schema = str(conn.exec_driver_sql("SELECT current_schema()").scalar())
        model_b = ReadModel(create_database_engine(pg_url, schema=schema))
        original = ReadModel.write
        writes_of_a: list[int] = []
        b_runs: list[KafkaRunner] = []

        def a_stalls_while_b_takes_over(self: ReadModel, *args: Any, **options: Any) -> None:
            if self is model_a:
                writes_of_a.append(1)
                if len(writes_of_a) == 2:
                    b, _ = _kafka_run(settings, topic, model_b, policies, group="b")
                    b_runs.append(b)
            original(self, *args, **options)

        monkeypatch.setattr(ReadModel, "write", a_stalls_while_b_takes_over)
        a, lag = _kafka_run(settings, topic, model_a, policies, group="a")
        assert b_runs and a.fenced == 1
        assert lag == 0
        assert 0 < b_runs[0].progress.events < head  # B went on from A's first batch
        # Every event counted once: A's first batch, then B's rest; A's second never landed.
        assert diff_read_models(from_store.engine, engine) == []
        model_b.engine.dispose()
