"""`continuum verify` (3): the events topic compared with the store, on a real broker.

The relay publishes a cohort; an independent client (librdkafka via confluent-kafka) then
adds what a broken or hostile producer could: an identical re-send (fine, counted), a message
for a stored event id with other bytes, messages that are no event of the store; events
committed but never relayed must be named as lag or as missing.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from continuum.adapters.kafka.publisher import KafkaPublisher, headers_for
from continuum.adapters.kafka.topic_reader import KafkaTopicReader
from continuum.adapters.sql.store import SqlCheckpoints, SqlEventStore
from continuum.application.relay import Relay
from continuum.application.service import PatientService
from continuum.application.verify import TopicReport, compare_topic
from continuum.domain.policy import PolicyRegistry
from continuum.entrypoints.cli import app
from continuum.settings import Settings
from continuum.simulation.cohort import simulate_cohort
from tests.kafka_broker import BrokerInfo, create_topic, unique_name
from tests.support import FixedClock

pytestmark = pytest.mark.kafka


def settings_for(info: BrokerInfo) -> Settings:
    env = {k.removeprefix("CONTINUUM_").lower(): v for k, v in info.settings_env().items()}
    return Settings.model_validate(env)


def cohort(store: SqlEventStore, policies: PolicyRegistry, patients: int, seed: int) -> int:
    clock = FixedClock(dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=patients, days=60, seed=seed)
    return store.head_position()


def relay_all(store: SqlEventStore, engine: Engine, info: BrokerInfo, topic: str) -> None:
    publisher = KafkaPublisher(settings_for(info), topic)
    try:
        Relay(store, SqlCheckpoints(engine), publisher, name="r", batch_size=100).drain()
    finally:
        publisher.close()


def check(store: SqlEventStore, info: BrokerInfo, topic: str) -> TopicReport:
    reader = KafkaTopicReader(settings_for(info), topic)
    try:
        head = store.head_position()
        return compare_topic(store, reader.messages(), store_head=head, page=64)
    finally:
        reader.close()


def produce(bootstrap: str, topic: str, messages: list[dict[str, Any]]) -> None:
    """Write with librdkafka, not the relay's client: what another producer could do."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    for message in messages:
        producer.produce(topic, **message)
    assert producer.flush(30) == 0


def kinds(report: TopicReport) -> list[tuple[str, int | None, str | None]]:
    return [(f.kind, f.position, f.event_id) for f in report.findings]


def test_relayed_cohort_matches_and_every_difference_is_named(
    pg_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(pg_engine)
    head = cohort(store, policies, patients=15, seed=31)
    topic = create_topic(kafka_broker.bootstrap_servers, unique_name("verify"), partitions=3)
    relay_all(store, pg_engine, kafka_broker, topic)

    clean = check(store, kafka_broker, topic)
    assert clean.ok and clean.findings == []
    assert (clean.messages, clean.duplicates, clean.topic_head, clean.lag) == (head, 0, head, 0)

    wires = {w.position: w for w in store.iter_wire()}
    resent, forged = wires[5], wires[9]
    envelope = json.loads(forged.value)
    envelope["data"]["note"] = "forged"
    stranger = {**json.loads(wires[3].value), "event_id": str(uuid.uuid4()), "position": head + 100}
    produce(
        kafka_broker.bootstrap_servers,
        topic,
        [
            # a re-send after a relay crash: same key, bytes and headers
            {"key": resent.stream_id, "value": resent.value, "headers": headers_for(resent)},
            # other bytes under a stored event's id
            {
                "key": forged.stream_id,
                "value": json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode(),
                "headers": headers_for(forged),
            },
            # an event the store never had
            {
                "key": resent.stream_id,
                "value": json.dumps(stranger).encode(),
                "headers": [("event_id", stranger["event_id"].encode())],
            },
            # not an event at all
            {"key": b"junk", "value": b"not json", "headers": []},
        ],
    )
    cohort(store, policies, patients=1, seed=32)  # committed, never relayed
    new_head = store.head_position()
    first_unrelayed = store.read_wire(head, 1)[0]

    report = check(store, kafka_broker, topic)
    found = kinds(report)
    assert not report.ok
    assert (report.duplicates, report.messages) == (1, head + 4), found
    assert ("differs", 9, forged.event_id) in found
    assert ("extra", head + 100, stranger["event_id"]) in found
    assert ("extra", None, None) in found
    assert ("lag", head + 1, first_unrelayed.event_id) in found
    assert len(found) == 4, found
    lag = next(f for f in report.findings if f.kind == "lag")
    assert f"{new_head - head} event(s) behind" in lag.message
    differs = next(f for f in report.findings if f.kind == "differs")
    assert "bytes (or key) differ" in differs.message
    assert {"partition", "offset"} <= set(differs.detail)


def test_an_event_never_relayed_or_relayed_altered_is_named(
    sqlite_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(sqlite_engine)
    head = cohort(store, policies, patients=6, seed=33)
    topic = create_topic(kafka_broker.bootstrap_servers, unique_name("skip"), partitions=2)
    wires = list(store.iter_wire())
    skipped, altered = wires[10], wires[20]
    # a relay that skipped one event and sent another with other bytes (and never the original)
    sent = [
        replace(w, value=w.value.replace(b'"actor":{"id":"', b'"actor":{"id":"x'))
        if w is altered
        else w
        for w in wires
        if w is not skipped
    ]
    assert sent[19].value != altered.value
    publisher = KafkaPublisher(settings_for(kafka_broker), topic)
    try:
        publisher.publish(sent, threading.Event())
    finally:
        publisher.close()
    report = check(store, kafka_broker, topic)
    assert kinds(report) == [
        ("missing", skipped.position, skipped.event_id),
        ("differs", altered.position, altered.event_id),
    ]
    assert report.messages == head - 1 and report.duplicates == 0


def test_a_message_under_another_events_position_is_named(
    sqlite_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(sqlite_engine)
    cohort(store, policies, patients=4, seed=34)
    topic = create_topic(kafka_broker.bootstrap_servers, unique_name("swap"), partitions=1)
    relay_all(store, sqlite_engine, kafka_broker, topic)
    first, second = store.read_wire(0, 2)
    # the bytes of event 1, labelled as event 2
    produce(
        kafka_broker.bootstrap_servers,
        topic,
        [{"key": first.stream_id, "value": first.value, "headers": headers_for(second)}],
    )
    report = check(store, kafka_broker, topic)
    assert kinds(report) == [("differs", 1, first.event_id)]
    assert "event_id differs" in report.findings[0].message


# -- through the CLI ------------------------------------------------------------------------


def test_verify_cli_reads_the_topic_and_exits_by_class(
    sqlite_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(sqlite_engine)
    head = cohort(store, policies, patients=5, seed=35)
    topic = create_topic(kafka_broker.bootstrap_servers, unique_name("cli"), partitions=3)
    relay_all(store, sqlite_engine, kafka_broker, topic)
    env = {"CONTINUUM_DATABASE_URL": str(sqlite_engine.url), **kafka_broker.settings_env()}
    runner = CliRunner()
    assert runner.invoke(app, ["seal"], env=env).exit_code == 0
    ok = runner.invoke(app, ["verify", "--topic", topic, "--format", "json"], env=env)
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout)
    assert result["ok"] and result["topic"]["messages"] == head and result["findings"] == []

    cohort(store, policies, patients=1, seed=36)  # not relayed: the topic lags
    lagging = runner.invoke(app, ["verify", "--topic", topic], env=env)
    assert lagging.exit_code == 13, lagging.output
    assert "lag" in lagging.stdout and "WARNING unsealed" in lagging.stdout

    wire = store.read_wire(0, 1)[0]
    produce(
        kafka_broker.bootstrap_servers,
        topic,
        [{"key": wire.stream_id, "value": wire.value + b" ", "headers": headers_for(wire)}],
    )
    differs = runner.invoke(app, ["verify", "--topic", topic], env=env)
    assert differs.exit_code == 12, differs.output
    assert f"differs       position 1 event {wire.event_id}" in differs.stdout


def test_verify_cli_names_a_missing_topic_and_an_unreachable_broker(
    tmp_path: Any, kafka_broker: BrokerInfo
) -> None:
    env = {
        "CONTINUUM_DATABASE_URL": f"sqlite:///{tmp_path / 'v.sqlite3'}",
        "CONTINUUM_KAFKA_CONNECT_TIMEOUT_MS": "1000",
    }
    runner = CliRunner()
    missing = unique_name("absent")
    result = runner.invoke(
        app, ["verify", "--topic", missing], env={**env, **kafka_broker.settings_env()}
    )
    assert result.exit_code == 8, result.output
    assert f"topic {missing} does not exist" in result.stderr
    unreachable = runner.invoke(app, ["verify", "--bootstrap-servers", "127.0.0.1:1"], env=env)
    assert unreachable.exit_code == 9, unreachable.output
    assert "cannot reach Kafka at 127.0.0.1:1" in unreachable.stderr


def test_an_empty_topic_is_clean_for_an_empty_store_and_all_lag_otherwise(
    sqlite_engine: Engine, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(sqlite_engine)
    topic = create_topic(kafka_broker.bootstrap_servers, unique_name("empty"), partitions=3)
    empty = check(store, kafka_broker, topic)
    assert empty.ok and (empty.messages, empty.store_head) == (0, 0)
    head = cohort(store, policies, patients=2, seed=37)
    behind = check(store, kafka_broker, topic)
    first = store.read_wire(0, 1)[0]
    assert kinds(behind) == [("lag", 1, first.event_id)]
    assert behind.lag == head
