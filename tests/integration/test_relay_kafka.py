"""The outbox relay against a real Kafka-protocol broker and a real PostgreSQL.

What the issue asks to see: a simulated cohort relayed and read back by an independent client
(librdkafka through confluent-kafka: Debian's kcat cannot talk to Tansu), every message valid
against the published JSON Schema, keyed by patient, exactly the store's events in per-patient
order; a broker outage in the middle of relaying loses nothing; a relay killed with SIGKILL
mid-batch and restarted misses nothing and duplicates only with the same event id;
configuration errors are clear.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy import Engine, insert, text
from typer.testing import CliRunner

from continuum.adapters.kafka.publisher import KafkaPublisher
from continuum.adapters.sql import tables as t
from continuum.adapters.sql.notify import PgNotifyWaiter
from continuum.adapters.sql.store import SqlCheckpoints, SqlEventStore, _to_row
from continuum.application.relay import Relay
from continuum.application.service import PatientService
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum.entrypoints.cli import app
from continuum.settings import Settings
from continuum.simulation.cohort import simulate_cohort
from tests.kafka_broker import BrokerInfo, OutageBroker, Record, consume_all, create_topic
from tests.kafka_broker import unique_name as unique
from tests.support import FixedClock, assessment

pytestmark = pytest.mark.kafka

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "events" / "schemas"
HANG_GUARD = 60.0  # seconds; only to turn a hang into a failure


def settings_for(bootstrap: str, info: BrokerInfo, **extra: Any) -> Settings:
    env = {k.removeprefix("CONTINUUM_").lower(): v for k, v in info.settings_env().items()}
    env["kafka_bootstrap_servers"] = bootstrap
    return Settings.model_validate({**env, **extra})


def cohort(store: SqlEventStore, policies: PolicyRegistry, patients: int, seed: int) -> int:
    clock = FixedClock(dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=patients, days=90, seed=seed)
    return store.head_position()


def store_events(store: SqlEventStore) -> list[tuple[str, int, str, bytes]]:
    """(stream_id, stream_version, event_id, wire bytes) in global order."""
    rows = []
    for wire in store.iter_wire(batch=5_000):
        version = json.loads(wire.value)["stream_version"]
        rows.append((wire.stream_id, version, wire.event_id, wire.value))
    return rows


def assert_topic_holds_the_store(
    records: list[Record], store: SqlEventStore, *, allow_duplicates: bool
) -> None:
    expected = store_events(store)
    by_id = {event_id: value for _, _, event_id, value in expected}
    seen: dict[str, bytes] = {}
    per_patient: dict[str, list[int]] = defaultdict(list)
    partition_of: dict[str, int] = {}
    for record in records:
        assert record.key is not None and record.value is not None
        headers = dict(record.headers)
        event_id = headers["event_id"].decode()
        assert record.value == by_id[event_id], "topic bytes differ from the store's"
        if event_id in seen:
            assert allow_duplicates, f"duplicate {event_id} without a crash"
            continue
        seen[event_id] = record.value
        body = json.loads(record.value)
        key = record.key.decode()
        assert key == body["stream_id"]
        assert partition_of.setdefault(key, record.partition) == record.partition
        per_patient[key].append(body["stream_version"])
    assert set(seen) == set(by_id), f"missing {len(set(by_id) - set(seen))} events"
    for key, versions in per_patient.items():
        assert versions == list(range(1, len(versions) + 1)), f"{key} out of order: {versions}"


# -- end to end, read by an independent client -------------------------------------------------


def independent_read(bootstrap: str, topic: str, expected: int) -> list[dict[str, Any]]:
    """Read the whole topic with librdkafka (confluent-kafka), not the relay's kafka-python."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("independent"),
            "enable.auto.commit": False,
        }
    )
    messages: list[dict[str, Any]] = []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + HANG_GUARD
        quiet_until = None
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                if len(messages) >= expected:
                    quiet_until = quiet_until or time.monotonic() + 1.0
                    if time.monotonic() > quiet_until:  # nothing more: no extra messages
                        break
                continue
            assert message.error() is None, message.error()
            messages.append(
                {
                    "key": message.key(),
                    "payload": message.value(),
                    "headers": dict(message.headers() or []),
                    "partition": message.partition(),
                    "offset": message.offset(),
                }
            )
    finally:
        consumer.close()
    return messages


def test_cohort_relayed_and_read_back_independently_validates_and_matches_the_store(
    pg_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(pg_engine)
    head = cohort(store, policies, patients=40, seed=21)
    topic = create_topic(kafka_broker.bootstrap_servers, unique("events"), partitions=3)
    settings = settings_for(kafka_broker.bootstrap_servers, kafka_broker)
    publisher = KafkaPublisher(settings, topic)
    try:
        relay = Relay(store, SqlCheckpoints(pg_engine), publisher, name="r", batch_size=250)
        assert relay.drain() == head
    finally:
        publisher.close()

    messages = independent_read(kafka_broker.bootstrap_servers, topic, head)
    assert len(messages) == head
    schemas = {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in SCHEMA_DIR.glob("*.schema.json")
    }
    records = []
    for message in messages:
        headers = message["headers"]
        assert headers["content-type"] == b"application/json"
        assert headers["security-label"] == b"42CFRPart2"
        assert headers["confidentiality"] == b"R"
        body = json.loads(message["payload"])
        assert headers["event_type"].decode() == body["event_type"]
        jsonschema.validate(body, schemas[headers["schema"].decode()])
        records.append(
            Record(
                key=message["key"],
                value=message["payload"],
                headers=tuple(headers.items()),
                partition=message["partition"],
                offset=message["offset"],
            )
        )
    records.sort(key=lambda r: (r.partition, r.offset))
    assert_topic_holds_the_store(records, store, allow_duplicates=False)


class StopAfterFirstCheckpoint(SqlCheckpoints):
    """The real checkpoints; the first one saved sets `stop` (an operator's Ctrl-C, say)."""

    def __init__(self, engine: Engine, stop: threading.Event) -> None:
        super().__init__(engine)
        self.stop = stop

    def put(self, name: str, position: int) -> None:
        super().put(name, position)
        self.stop.set()


def test_drain_stops_between_batches_when_asked_and_resumes_from_its_checkpoint(
    pg_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(pg_engine)
    head = cohort(store, policies, patients=30, seed=24)
    batch = 40
    assert head > 4 * batch, "a backlog of several batches, or the test proves nothing"
    topic = create_topic(kafka_broker.bootstrap_servers, unique("stop"), partitions=3)
    publisher = KafkaPublisher(settings_for(kafka_broker.bootstrap_servers, kafka_broker), topic)
    stop = threading.Event()
    checkpoints = StopAfterFirstCheckpoint(pg_engine, stop)
    try:
        relay = Relay(store, checkpoints, publisher, name="r", batch_size=batch)
        # Batch 2 was already in flight when batch 1's checkpoint set `stop`: it is finished
        # and checkpointed, and nothing more is read.
        assert relay.drain(stop) == 2 * batch
        assert checkpoints.get("r") == store.read_wire(0, 2 * batch)[-1].position
        assert relay.drain() == head - 2 * batch
    finally:
        publisher.close()
    assert checkpoints.get("r") == head
    records = consume_all(kafka_broker.bootstrap_servers, topic, head, timeout=30)
    assert_topic_holds_the_store(records, store, allow_duplicates=False)


# -- outages and crashes ----------------------------------------------------------------------


def add_events(store: SqlEventStore, policies: PolicyRegistry, count: int) -> None:
    service = PatientService(store, policies, FixedClock())
    for _ in range(count):
        service.handle(
            c.Admit(
                level="3.5",
                site="site-x",
                age_group="adult",
                assessment=assessment("001040"),
                occurred_at=dt.datetime(2026, 9, 1, tzinfo=dt.UTC),
            )
        )


@pytest.mark.parametrize("outage", ["connection cut", "broker process stopped"])
def test_broker_outage_in_the_middle_of_relaying_loses_nothing(
    pg_engine: Engine, policies: PolicyRegistry, outage_broker: OutageBroker, outage: str
) -> None:
    store = SqlEventStore(pg_engine)
    head = cohort(store, policies, patients=30, seed=22)
    topic = create_topic(outage_broker.bootstrap, unique("outage"), partitions=3)
    settings = settings_for(outage_broker.bootstrap, outage_broker.info)
    checkpoints = SqlCheckpoints(pg_engine)
    publisher = KafkaPublisher(settings, topic, wait_report=0.5)
    relay = Relay(store, checkpoints, publisher, name="r", batch_size=50, idle_timeout=0.2)
    stop = threading.Event()
    worker = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    worker.start()
    try:
        wait_for(lambda: checkpoints.get("r") > 0, "the relay to publish a first batch")
        if outage == "connection cut":
            outage_broker.proxy.cut()  # the broker is gone, as far as the relay can tell
        else:
            outage_broker.broker.pause()  # SIGSTOP: the broker answers nothing, keeps its data
        add_events(store, policies, 25)  # work keeps arriving during the outage
        time.sleep(2.0)
        during = checkpoints.get("r")
        assert during < store.head_position(), "nothing can be acknowledged while cut"
        if outage == "connection cut":
            outage_broker.proxy.restore()
        else:
            outage_broker.broker.resume()
        wait_for(lambda: checkpoints.get("r") == store.head_position(), "the relay to catch up")
    finally:
        stop.set()
        worker.join(HANG_GUARD)
        publisher.close()
    assert store.head_position() == head + 25
    records = consume_all(outage_broker.bootstrap, topic, store.head_position(), timeout=30)
    assert_topic_holds_the_store(records, store, allow_duplicates=False)


def test_relay_killed_mid_batch_and_restarted_misses_nothing(
    pg_engine: Engine, pg_url: str, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(pg_engine)
    cohort(store, policies, patients=150, seed=23)
    topic = create_topic(kafka_broker.bootstrap_servers, unique("kill"), partitions=3)
    schema = _schema_of(pg_engine)
    env = {
        **os.environ,
        **kafka_broker.settings_env(),
        "CONTINUUM_DATABASE_URL": f"{pg_url}?options=-csearch_path%3D{schema}",
        "CONTINUUM_EVENTS_TOPIC": topic,
        "CONTINUUM_RELAY_BATCH_SIZE": "100",
    }
    exe = str(Path(sys.executable).parent / "continuum")
    checkpoints = SqlCheckpoints(pg_engine)
    name = f"relay:{topic}"
    head = store.head_position()
    relay = subprocess.Popen(
        [exe, "relay"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: checkpoints.get(name) > 0, "the relay subprocess to publish")
        os.kill(relay.pid, signal.SIGKILL)
        relay.wait(HANG_GUARD)
    finally:
        if relay.poll() is None:
            relay.kill()
        relay.communicate(timeout=HANG_GUARD)
    killed_at = checkpoints.get(name)
    assert 0 < killed_at < head, "kill it mid-way, or the test proves nothing"

    again = subprocess.run(
        [exe, "relay", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert checkpoints.get(name) == head
    records = consume_all(kafka_broker.bootstrap_servers, topic, head, timeout=30)
    assert len(records) >= head
    assert_topic_holds_the_store(records, store, allow_duplicates=True)


def _schema_of(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(text("SELECT current_schema()")))


def wait_for(condition: Any, what: str, timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- never publishes what has not committed; wakes on commit ----------------------------------


def test_an_uncommitted_append_is_never_published(
    pg_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(pg_engine)
    add_events(store, policies, 1)
    template = store.read_stream(store.stream_ids()[0])[0]
    unfinished = template.model_copy(
        update={"event_id": uuid.uuid4(), "stream_id": "pk-" + "b" * 20, "position": None}
    )
    topic = create_topic(kafka_broker.bootstrap_servers, unique("uncommitted"), partitions=1)
    settings = settings_for(kafka_broker.bootstrap_servers, kafka_broker)
    publisher = KafkaPublisher(settings, topic)
    relay = Relay(store, SqlCheckpoints(pg_engine), publisher, name="r")
    try:
        with pg_engine.connect() as open_tx:
            open_tx.begin()
            row_id = open_tx.execute(
                insert(t.events).values(**_to_row(unfinished)).returning(t.events.c.row_id)
            ).scalar_one()
            open_tx.execute(insert(t.event_pending).values(row_id=row_id))
            assert relay.drain() == 1  # only the committed admission
            add_events(store, policies, 1)  # a later writer commits first
            assert relay.drain() == 1
            open_tx.commit()
        assert relay.drain() == 1  # now the late commit goes out, after the others
    finally:
        publisher.close()
    records = consume_all(kafka_broker.bootstrap_servers, topic, 3, timeout=20)
    ids = [dict(r.headers)["event_id"].decode() for r in records]
    assert ids[-1] == str(unfinished.event_id)
    assert len(ids) == 3


def test_postgres_listener_is_woken_by_a_commit(
    pg_engine: Engine, policies: PolicyRegistry
) -> None:
    store = SqlEventStore(pg_engine)
    waiter = PgNotifyWaiter(pg_engine)
    try:
        assert waiter.wait(0.2) is False  # nothing committed: it times out
        timer = threading.Timer(0.3, add_events, args=(store, policies, 1))
        timer.start()
        assert waiter.wait(HANG_GUARD) is True  # woken by the commit, long before the timeout
        timer.join()
    finally:
        waiter.close()


# -- configuration errors -----------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        "CONTINUUM_DATABASE_URL": f"sqlite:///{tmp_path / 'relay.sqlite3'}",
        "CONTINUUM_KAFKA_CONNECT_TIMEOUT_MS": "1000",
    }


def test_unreachable_broker_is_a_clear_error(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CONTINUUM_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    result = CliRunner().invoke(app, ["relay", "--once"], env=env)
    assert result.exit_code == 9, result.output
    assert "cannot reach Kafka at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_topic_is_a_clear_error(cli_env: dict[str, str], kafka_broker: BrokerInfo) -> None:
    env = {**cli_env, **kafka_broker.settings_env()}
    missing = unique("absent")
    result = CliRunner().invoke(app, ["relay", "--once", "--topic", missing], env=env)
    assert result.exit_code == 8, result.output
    assert f"topic {missing} does not exist" in result.stderr
    assert "--create-topic" in result.stderr
    created = CliRunner().invoke(
        app, ["relay", "--once", "--topic", missing, "--create-topic"], env=env
    )
    assert created.exit_code == 0, created.stderr
    assert "published 0 events" in created.stdout


def test_relay_from_the_embedded_sqlite_store_polls_and_publishes(
    sqlite_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    from continuum.application.relay import PollingWaiter

    store = SqlEventStore(sqlite_engine)
    head = cohort(store, policies, patients=10, seed=24)
    topic = create_topic(kafka_broker.bootstrap_servers, unique("sqlite"), partitions=3)
    publisher = KafkaPublisher(settings_for(kafka_broker.bootstrap_servers, kafka_broker), topic)
    checkpoints = SqlCheckpoints(sqlite_engine)
    relay = Relay(
        store, checkpoints, publisher, name="r", waiter=PollingWaiter(0.05), idle_timeout=0.05
    )
    stop = threading.Event()
    worker = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    worker.start()
    try:
        wait_for(lambda: checkpoints.get("r") == head, "the backlog to be published")
        add_events(store, policies, 3)  # committed while the relay sleeps between polls
        wait_for(lambda: checkpoints.get("r") == head + 3, "the new events to be polled")
    finally:
        stop.set()
        worker.join(HANG_GUARD)
        publisher.close()
    records = consume_all(kafka_broker.bootstrap_servers, topic, head + 3, timeout=30)
    assert_topic_holds_the_store(records, store, allow_duplicates=False)


def test_refused_topic_access_is_explained_with_what_to_grant() -> None:
    from kafka.errors import TopicAuthorizationFailedError

    from continuum.adapters.kafka.clients import explain
    from continuum.adapters.kafka.errors import TopicProblem

    problem = explain(
        TopicAuthorizationFailedError(),
        Settings(kafka_bootstrap_servers="kafka.example:9092"),
        topic="continuum.events.v1",
    )
    assert isinstance(problem, TopicProblem)
    assert problem.rule == "kafka.not_authorized"
    assert "refused access to topic continuum.events.v1" in problem.message
    assert "WRITE and DESCRIBE for the relay" in problem.message
