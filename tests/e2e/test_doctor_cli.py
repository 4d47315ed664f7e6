"""`continuum doctor` end to end: PostgreSQL (a fresh schema per test) and the session's
Kafka-protocol broker. A healthy deployment passes (exit 0); each broken one (database
unreachable, not migrated, broker unreachable, topic missing, lag) FAILs or WARNs, says what to
fix, and the fix it names makes the check pass."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from continuum.adapters.sql.database import create_database_engine
from tests.kafka_broker import BrokerInfo, create_topic, free_port, unique_name

runner = CliRunner()
ISSUER = "https://login.example.org/realms/care"

pytestmark = [pytest.mark.postgres]


class Doctor:
    """Runs `continuum ...` in-process with one deployment's settings."""

    def __init__(self, env: dict[str, str | None]) -> None:
        self.env = env

    def run(self, *args: str, code: int = 0) -> Any:
        from continuum.entrypoints.cli import app

        result = runner.invoke(app, list(args), env=self.env)
        assert result.exit_code == code, (
            f"continuum {' '.join(args)} exited {result.exit_code}, expected {code}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\n{result.exception!r}"
        )
        return result

    def doctor(self, *args: str, code: int = 0) -> dict[str, dict[str, Any]]:
        result = self.run("doctor", "--format", "json", "--timeout", "3", *args, code=code)
        report = json.loads(result.stdout)
        assert report["ok"] is (code == 0)
        return {check["name"]: check for check in report["checks"]}

    def admit(self) -> None:
        self.run(
            "admit",
            "--level=3.5",
            "--site=site-a",
            "--ratings=0,0,1,0,4,0",
            "--occurred-at=2026-10-01T09:00:00+00:00",
        )


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    schema = f"doctor_{uuid.uuid4().hex[:10]}"
    admin = create_database_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_url else "?"
    try:
        yield f"{pg_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _base_env(database_url: str) -> dict[str, str | None]:
    return {
        "CONTINUUM_DATABASE_URL": database_url,
        "CONTINUUM_AUTH_MODE": "oidc",
        "CONTINUUM_AUTH_ISSUER": ISSUER,
        "CONTINUUM_KAFKA_BOOTSTRAP_SERVERS": None,
        "CONTINUUM_READ_MODEL_URL": None,
    }


@pytest.fixture
def deployment(pg_schema_url: str, kafka_broker: BrokerInfo) -> Doctor:
    """A migrated database and unique topic and group names on the session broker (topics
    not created yet)."""
    env = {
        **_base_env(pg_schema_url),
        **kafka_broker.settings_env(),
        "CONTINUUM_EVENTS_TOPIC": unique_name("doctor-events"),
        "CONTINUUM_ADT_TOPIC": unique_name("doctor-adt"),
        "CONTINUUM_INGEST_GROUP": unique_name("doctor-ingest"),
    }
    doctor = Doctor(env)
    doctor.run("db", "upgrade")
    return doctor


def _topics(doctor: Doctor, kafka_broker: BrokerInfo, *, partitions: int = 6) -> None:
    events, adt = doctor.env["CONTINUUM_EVENTS_TOPIC"], doctor.env["CONTINUUM_ADT_TOPIC"]
    assert events and adt
    for name in (events, adt, f"{adt}.dlq"):
        create_topic(kafka_broker.bootstrap_servers, name, partitions=partitions)


def _statuses(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


@pytest.mark.kafka
def test_a_healthy_deployment_passes(deployment: Doctor, kafka_broker: BrokerInfo) -> None:
    group = unique_name("doctor-projections")
    _topics(deployment, kafka_broker)
    deployment.admit()
    deployment.run("relay", "--once")
    deployment.run("project", "--source", "kafka", "--group", group)
    checks = deployment.doctor("--group", group)
    events = deployment.env["CONTINUUM_EVENTS_TOPIC"]
    adt = deployment.env["CONTINUUM_ADT_TOPIC"]
    expected = {
        "database",
        "schema",
        "relay",
        "broker",
        f"topic {events}",
        f"topic {adt}",
        f"topic {adt}.dlq",
        "projections",
        f"group {group}",
        f"group {deployment.env['CONTINUUM_INGEST_GROUP']}",
    }
    statuses = _statuses(checks)
    assert expected <= set(statuses)
    assert {statuses[name] for name in expected} == {"ok"}, checks
    assert statuses["config"] != "fail"
    assert checks["projections"]["details"]["source"] == f"kafka:{events}"
    assert checks["relay"]["details"]["lag"] == 0
    text_out = deployment.run("doctor", "--group", group, "--timeout", "3").stdout
    assert f"OK    topic {events}" in text_out
    assert "0 fail" in text_out


def test_an_unreachable_database(pg_url: str) -> None:
    port = free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/nowhere"
    doctor = Doctor(_base_env(url))
    checks = doctor.doctor(code=1)
    database = checks["database"]
    assert database["status"] == "fail"
    assert f"127.0.0.1:{port}/nowhere" in database["summary"]
    assert "CONTINUUM_DATABASE_URL" in database["fix"]
    assert checks["schema"]["status"] == checks["projections"]["status"] == "skip"
    assert checks["broker"]["status"] == "skip"  # Kafka not configured here
    result = doctor.run("doctor", "--timeout", "2", code=1)
    assert "FAIL  database" in result.stdout
    assert "fix: check CONTINUUM_DATABASE_URL" in result.stdout


def test_a_database_not_migrated(pg_schema_url: str) -> None:
    doctor = Doctor(_base_env(pg_schema_url))
    checks = doctor.doctor(code=1)
    schema = checks["schema"]
    assert schema["status"] == "fail"
    assert "empty (no schema)" in schema["summary"]
    assert schema["fix"].startswith("run `continuum db upgrade`")
    doctor.run("db", "upgrade")  # the fix it names
    after = doctor.doctor("--check", "schema")
    assert after["schema"]["status"] == "ok"
    assert set(after) == {"config", "schema"}


@pytest.mark.kafka
def test_an_unreachable_broker(pg_schema_url: str, kafka_broker: BrokerInfo) -> None:
    env = {**_base_env(pg_schema_url), **kafka_broker.settings_env()}
    env["CONTINUUM_KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    doctor = Doctor(env)
    doctor.run("db", "upgrade")
    checks = doctor.doctor(code=1)
    broker = checks["broker"]
    assert broker["status"] == "fail"
    assert env["CONTINUUM_KAFKA_BOOTSTRAP_SERVERS"] in broker["summary"]
    assert "CONTINUUM_KAFKA_BOOTSTRAP_SERVERS" in broker["fix"]
    skipped = [name for name in checks if name.startswith(("topic ", "group "))]
    assert skipped and all(checks[name]["status"] == "skip" for name in skipped)
    assert checks["database"]["status"] == "ok"


@pytest.mark.kafka
def test_a_missing_topic(deployment: Doctor, kafka_broker: BrokerInfo) -> None:
    events = deployment.env["CONTINUUM_EVENTS_TOPIC"]
    checks = deployment.doctor("--no-ingest", code=1)
    topic = checks[f"topic {events}"]
    assert topic["status"] == "fail"
    assert "does not exist" in topic["summary"]
    command = "continuum relay --create-topic --partitions 6 --replication-factor 1"
    assert topic["fix"].startswith(f"create topic {events} with 6 partitions: `{command}`")
    assert not any(name.startswith("topic ") and "adt" in name for name in checks)
    deployment.run("relay", "--once", "--create-topic", "--partitions", "6")  # the fix it names
    after = deployment.doctor("--no-ingest", "--check", "topics")
    assert after[f"topic {events}"]["status"] == "ok"
    assert after[f"topic {events}"]["details"]["partitions"] == 6


@pytest.mark.kafka
def test_too_few_partitions_is_a_warning(deployment: Doctor, kafka_broker: BrokerInfo) -> None:
    _topics(deployment, kafka_broker, partitions=2)
    checks = deployment.doctor("--check", "topics", "--partitions", "3")
    events = deployment.env["CONTINUUM_EVENTS_TOPIC"]
    assert checks[f"topic {events}"]["status"] == "warn"
    assert "2 partitions, expected 3" in checks[f"topic {events}"]["summary"]


@pytest.mark.kafka
def test_lag(deployment: Doctor, kafka_broker: BrokerInfo) -> None:
    group = unique_name("doctor-projections")
    _topics(deployment, kafka_broker)
    deployment.admit()
    # The relay has not run: its lag is the whole log.
    checks = deployment.doctor("--group", group)
    relay = checks["relay"]
    assert relay["status"] == "warn"
    assert relay["details"]["lag"] == relay["details"]["head"] > 0
    assert "start `continuum relay`" in relay["fix"]
    strict = deployment.doctor("--group", group, "--max-lag", "0", code=1)
    assert strict["relay"]["status"] == "fail"
    # Relayed and projected from Kafka, then more events: the projection workers lag.
    deployment.run("relay", "--once")
    deployment.run("project", "--source", "kafka", "--group", group)
    deployment.admit()
    deployment.run("relay", "--once")
    checks = deployment.doctor("--group", group)
    statuses = _statuses(checks)
    assert statuses["relay"] == "ok"
    assert statuses["projections"] == "warn", checks["projections"]
    assert checks["projections"]["details"]["lag"] > 0
    assert "continuum project --source kafka --follow" in checks["projections"]["fix"]
    lagging = checks[f"group {group}"]
    assert lagging["status"] == "warn"
    assert lagging["details"]["lag"] > 0
    assert "`continuum project --source kafka --follow`" in lagging["fix"]
    deployment.doctor("--group", group, "--max-lag", "0", code=1)
    # Caught up again: no lag left.
    deployment.run("project", "--source", "kafka", "--group", group)
    after = _statuses(deployment.doctor("--group", group))
    assert after["projections"] == after[f"group {group}"] == "ok"
