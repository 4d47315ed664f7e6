"""Kafka clients built from settings, and Kafka failures turned into clear errors.

Producer defaults favour an exact, ordered copy of the log: acks=all, idempotence on, and a
delivery timeout so long that the producer itself keeps retrying through a broker outage (its
retries are de-duplicated by the broker; a resend by us would not be).
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (
    AuthorizationError,
    KafkaError,
    KafkaTimeoutError,
    TopicAlreadyExistsError,
)

from continuum.adapters.kafka.errors import BrokerUnavailable, TopicProblem
from continuum.domain.errors import ContinuumError
from continuum.settings import Settings

#: A week: an outage shorter than this is waited out by the producer's own retries.
DELIVERY_TIMEOUT_MS = 7 * 24 * 3600 * 1000


def _bootstrap(settings: Settings) -> list[str]:
    return [s.strip() for s in settings.kafka_bootstrap_servers.split(",") if s.strip()]


def explain(exc: BaseException, settings: Settings, *, topic: str | None = None) -> ContinuumError:
    """A Kafka failure as one clear sentence that says what to do."""
    where = settings.kafka_bootstrap_servers
    if isinstance(exc, KafkaTimeoutError) and "bootstrap" in str(exc):
        return BrokerUnavailable(
            f"cannot reach Kafka at {where}: check CONTINUUM_KAFKA_BOOTSTRAP_SERVERS and that "
            "the broker is running",
            bootstrap=where,
        )
    if isinstance(exc, AuthorizationError):
        return TopicProblem(
            f"Kafka at {where} refused access to topic {topic or '?'} "
            f"({type(exc).__name__}): grant this client's principal the needed ACLs "
            "(WRITE and DESCRIBE for the relay; READ for consumers)",
            rule="kafka.not_authorized",
            topic=topic,
        )
    return BrokerUnavailable(
        f"Kafka at {where} failed: {type(exc).__name__}: {exc}", bootstrap=where, topic=topic
    )


def producer(settings: Settings, **overrides: Any) -> KafkaProducer:
    config: dict[str, Any] = {
        "bootstrap_servers": _bootstrap(settings),
        "client_id": settings.kafka_client_id,
        "acks": "all",
        "enable_idempotence": True,
        "max_in_flight_requests_per_connection": 5,
        "linger_ms": 10,
        "batch_size": 262_144,
        "compression_type": "lz4",
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "delivery_timeout_ms": DELIVERY_TIMEOUT_MS,
        "max_block_ms": settings.kafka_request_timeout_ms,
        "reconnect_backoff_max_ms": 2_000,
        "bootstrap_timeout_ms": settings.kafka_connect_timeout_ms,
    }
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except KafkaError as exc:
        raise explain(exc, settings) from exc


def consumer(
    settings: Settings, *topics: str, group: str | None, **overrides: Any
) -> KafkaConsumer:
    config: dict[str, Any] = {
        "bootstrap_servers": _bootstrap(settings),
        "client_id": settings.kafka_client_id,
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "request_timeout_ms": max(
            settings.kafka_request_timeout_ms, settings.kafka_session_timeout_ms + 5_000
        ),
        "reconnect_backoff_max_ms": 2_000,
        "bootstrap_timeout_ms": settings.kafka_connect_timeout_ms,
    }
    config.update(overrides)
    try:
        return KafkaConsumer(*topics, **config)
    except KafkaError as exc:
        raise explain(exc, settings, topic=",".join(topics)) from exc


def admin(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(
            bootstrap_servers=_bootstrap(settings),
            client_id=settings.kafka_client_id,
            request_timeout_ms=settings.kafka_request_timeout_ms,
            bootstrap_timeout_ms=settings.kafka_connect_timeout_ms,
        )
    except KafkaError as exc:
        raise explain(exc, settings) from exc


def ensure_topic(
    settings: Settings, topic: str, *, create: bool, partitions: int, replication: int
) -> int:
    """Check that `topic` exists (creating it when allowed); return its partition count."""
    client = admin(settings)
    try:
        try:
            existing = set(client.list_topics())
        except KafkaError as exc:
            raise explain(exc, settings, topic=topic) from exc
        if topic not in existing:
            if not create:
                raise TopicProblem(
                    f"topic {topic} does not exist on {settings.kafka_bootstrap_servers}: create "
                    f"it with {partitions} partitions (or run with --create-topic)",
                    topic=topic,
                )
            try:
                client.create_topics(
                    [NewTopic(topic, num_partitions=partitions, replication_factor=replication)]
                )
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:
                raise explain(exc, settings, topic=topic) from exc
        described = client.describe_topics([topic])
        return len(described[0].get("partitions", [])) if described else 0
    finally:
        client.close()
