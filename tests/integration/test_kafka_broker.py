"""The test broker itself: it answers, keeps what it is given, and can be broken on purpose."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.partitioner.default import murmur2

from continuum.settings import Settings
from tests.kafka_broker import (
    BOOTSTRAP_ENV,
    BrokerInfo,
    BrokerUnavailableError,
    OutageBroker,
    Record,
    TansuBroker,
    consume_all,
    create_topic,
    describe_cluster,
    external_broker,
    provide_broker,
    unique_name,
)

pytestmark = pytest.mark.kafka


def producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "acks": "all",
        "enable_idempotence": True,
        "max_block_ms": 10_000,
        "request_timeout_ms": 10_000,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def test_broker_answers(kafka_broker: BrokerInfo) -> None:
    cluster = describe_cluster(kafka_broker.bootstrap_servers)
    assert cluster["brokers"], cluster
    if kafka_broker.cluster_id is not None:  # one we started: it must be ours, not a neighbour
        assert cluster["cluster_id"] == kafka_broker.cluster_id


def test_settings_env_configures_continuum(
    kafka_broker: BrokerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in kafka_broker.settings_env().items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.kafka_bootstrap_servers == kafka_broker.bootstrap_servers
    assert settings.kafka_session_timeout_ms == kafka_broker.session_timeout_ms
    assert settings.kafka_heartbeat_interval_ms == kafka_broker.heartbeat_interval_ms


def test_round_trip_keeps_key_value_and_headers(kafka_broker: BrokerInfo, kafka_topic: str) -> None:
    headers = [("event-type", b"EpisodeOpened"), ("schema", b"v1")]
    with contextlib.closing(producer(kafka_broker.bootstrap_servers)) as p:
        meta = p.send(kafka_topic, key=b"patient-1", value=b'{"n": 1}', headers=headers).get(10)

    records = consume_all(kafka_broker.bootstrap_servers, kafka_topic, 1)

    assert records == [
        Record(
            key=b"patient-1",
            value=b'{"n": 1}',
            headers=tuple(headers),
            partition=meta.partition,
            offset=meta.offset,
        )
    ]


def test_keyed_partitioning_is_stable_and_kafka_compatible(
    kafka_broker: BrokerInfo, kafka_topic: str
) -> None:
    keys = [f"patient-{i}".encode() for i in range(12)]
    with contextlib.closing(producer(kafka_broker.bootstrap_servers, linger_ms=5)) as p:
        futures = [p.send(kafka_topic, key=k, value=b"%d" % n) for n in range(3) for k in keys]
        p.flush(timeout=10)
    acked = [f.get(0) for f in futures]

    records = consume_all(kafka_broker.bootstrap_servers, kafka_topic, len(futures))

    assert len(records) == len(futures) == len(acked)
    seen: defaultdict[bytes, set[int]] = defaultdict(set)
    for record in records:
        assert record.key is not None
        seen[record.key].add(record.partition)
    assert set(seen) == set(keys)
    for key, partitions in seen.items():
        # Kafka's default partitioner (murmur2), so Java and librdkafka producers agree.
        assert partitions == {(murmur2(key) & 0x7FFFFFFF) % 3}, key
    assert len(set().union(*seen.values())) == 3  # the keys do spread


def _group_consumer(info: BrokerInfo, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=info.bootstrap_servers.split(","),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=info.session_timeout_ms + 10_000,
        **info.consumer_timing(),
    )


def _poll_values(consumer: KafkaConsumer, count: int, timeout_s: float = 20.0) -> list[bytes]:
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < count and time.monotonic() < deadline:
        for msgs in consumer.poll(timeout_ms=200).values():
            values.extend(m.value for m in msgs)
    return values


def test_consumer_group_commits_and_a_second_member_resumes(
    kafka_broker: BrokerInfo, kafka_topic: str
) -> None:
    group = unique_name("test-group")
    first = [b"a%d" % i for i in range(5)]
    later = [b"b%d" % i for i in range(3)]
    with contextlib.closing(producer(kafka_broker.bootstrap_servers)) as p:
        for value in first:
            p.send(kafka_topic, key=value, value=value)
        p.flush(timeout=10)

    with contextlib.closing(_group_consumer(kafka_broker, kafka_topic, group)) as consumer:
        assert sorted(_poll_values(consumer, len(first))) == first
        consumer.commit()
        tps = [TopicPartition(kafka_topic, p) for p in range(3)]
        assert sum(consumer.committed(tp) or 0 for tp in tps) == len(first)

    with contextlib.closing(producer(kafka_broker.bootstrap_servers)) as p:
        for value in later:
            p.send(kafka_topic, key=value, value=value)
        p.flush(timeout=10)

    with contextlib.closing(_group_consumer(kafka_broker, kafka_topic, group)) as consumer:
        assert sorted(_poll_values(consumer, len(later))) == later


def _outage_producer(outage: OutageBroker) -> KafkaProducer:
    return producer(
        outage.bootstrap,
        request_timeout_ms=30_000,
        delivery_timeout_ms=120_000,
        reconnect_backoff_ms=50,
        reconnect_backoff_max_ms=300,
        retry_backoff_ms=100,
    )


def test_proxy_cut_stalls_sends_and_restore_delivers(outage_broker: OutageBroker) -> None:
    proxy = outage_broker.proxy
    topic = create_topic(outage_broker.bootstrap, unique_name("outage"), partitions=1)
    with contextlib.closing(_outage_producer(outage_broker)) as p:
        p.send(topic, value=b"before").get(10)
        assert proxy.live_connections() >= 1  # the producer's traffic goes through the proxy

        proxy.cut()
        stalled = p.send(topic, value=b"during")
        with pytest.raises(KafkaTimeoutError):
            stalled.get(2)
        assert not stalled.is_done
        assert proxy.live_connections() == 0

        proxy.restore()
        stalled.get(20)  # the same producer delivers what it held
        p.send(topic, value=b"after").get(10)

    records = consume_all(outage_broker.bootstrap, topic, 3)
    assert [r.value for r in records] == [b"before", b"during", b"after"]


def test_pause_resume_keeps_data(outage_broker: OutageBroker) -> None:
    broker = outage_broker.broker
    topic = create_topic(outage_broker.bootstrap, unique_name("pause"), partitions=1)
    with contextlib.closing(_outage_producer(outage_broker)) as p:
        for i in range(3):
            p.send(topic, value=b"v%d" % i)
        p.flush(timeout=10)

        broker.pause()
        try:
            stalled = p.send(topic, value=b"while-paused")
            with pytest.raises(KafkaTimeoutError):
                stalled.get(1.5)
        finally:
            broker.resume()
        stalled.get(20)

    records = consume_all(outage_broker.bootstrap, topic, 4)
    assert [r.value for r in records] == [b"v0", b"v1", b"v2", b"while-paused"]


def test_tansu_moves_to_a_free_port_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))  # bound, not listening: Tansu cannot have it
        taken = squatter.getsockname()[1]
        broker = TansuBroker(tmp_path, port=taken)
        with broker:
            assert broker.port != taken
            assert describe_cluster(broker.bootstrap)["cluster_id"] == broker.cluster_id
        assert not broker.is_running()
    assert "AddrInUse" in broker.log_path.read_text(errors="replace")


def test_unreachable_configured_broker_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unused:
        unused.bind(("127.0.0.1", 0))  # reserved, never listening: connections are refused
        address = f"127.0.0.1:{unused.getsockname()[1]}"
        monkeypatch.setenv(BOOTSTRAP_ENV, address)
        with contextlib.ExitStack() as stack, pytest.raises(BrokerUnavailableError) as raised:
            stack.enter_context(provide_broker(tmp_path))

    message = str(raised.value)
    assert re.search(rf"{BOOTSTRAP_ENV}={re.escape(address)}\b", message), message
    assert f"unset {BOOTSTRAP_ENV}" in message
    assert not list(tmp_path.iterdir())  # nothing was started instead

    monkeypatch.delenv(BOOTSTRAP_ENV)
    assert external_broker() is None


def test_selection_order_configured_then_docker_then_tansu(
    kafka_broker: BrokerInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import testcontainers.community.kafka as tc_kafka

    from tests import kafka_broker as selection

    events: list[str] = []

    class FakeKafkaContainer:
        def start(self) -> FakeKafkaContainer:
            events.append("start")
            return self

        def get_bootstrap_server(self) -> str:
            return "docker-host:32768"

        def stop(self) -> None:
            events.append("stop")

    monkeypatch.setattr(tc_kafka, "KafkaContainer", FakeKafkaContainer)

    # 1. a configured broker that answers wins, whatever else is available
    monkeypatch.setattr(selection, "docker_engine_answers", lambda: True)
    monkeypatch.setenv(BOOTSTRAP_ENV, kafka_broker.bootstrap_servers)
    with provide_broker(tmp_path) as info:
        assert (info.kind, info.bootstrap_servers) == ("external", kafka_broker.bootstrap_servers)
    assert events == []

    # 2. else testcontainers when a Docker engine answers, stopped afterwards
    monkeypatch.delenv(BOOTSTRAP_ENV)
    with provide_broker(tmp_path) as info:
        assert (info.kind, info.bootstrap_servers) == ("testcontainers", "docker-host:32768")
        assert info.session_timeout_ms >= 6_000  # Kafka's group.min.session.timeout.ms
    assert events == ["start", "stop"]

    # 3. else a Tansu of our own, stopped afterwards
    monkeypatch.setattr(selection, "docker_engine_answers", lambda: False)
    with provide_broker(tmp_path) as info:
        assert info.kind == "tansu"
        assert describe_cluster(info.bootstrap_servers)["cluster_id"] == info.cluster_id
    assert _tcp_refused(info.bootstrap_servers)


def _tcp_refused(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return False
    except OSError:
        return True
