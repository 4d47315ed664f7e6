"""Disclosure to an organization under consent, against a real Kafka-protocol broker and real
SQLite and PostgreSQL stores (docs/consent.md).

What the issue asks to see: an organization without consent receives nothing; with consent it
receives exactly its consented patients' events from the consent on, with the Part 2 headers;
after a revocation nothing new (what was sent stays); another organization's consent does not
leak; every message has a disclosure row and every row a message; a restart resumes from the
checkpoint without loss, and anything sent twice is byte-identical with the same event id.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from continuum.adapters.kafka.disclosure import KafkaDisclosureChannel
from continuum.adapters.sql.disclosures import SqlDisclosureRecord
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.disclosure import (
    PART2_NOTICE,
    Disclosure,
    DisclosurePublisher,
    DisclosureRecord,
    disclosure_topic,
)
from continuum.application.service import PatientService
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum.entrypoints.cli import app
from continuum.settings import Settings
from continuum.simulation.cohort import simulate_cohort
from continuum_events import ConsentPurpose
from tests.kafka_broker import BrokerInfo, Record, consume_all, create_topic
from tests.support import FixedClock, assessment

pytestmark = pytest.mark.kafka

HANG_GUARD = 60.0
NOW = dt.datetime(2026, 9, 1, 9, 0, tzinfo=dt.UTC)


def settings_for(info: BrokerInfo, **extra: Any) -> Settings:
    env = {k.removeprefix("CONTINUUM_").lower(): v for k, v in info.settings_env().items()}
    return Settings.model_validate({**env, **extra})


def new_org(prefix: str = "org") -> str:
    """An org code no other test on the session broker uses (its topic is new)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Engine:
    fixture = {"sqlite": "sqlite_engine", "postgres": "pg_engine"}[request.param]
    resolved: Engine = request.getfixturevalue(fixture)
    return resolved


@dataclass
class Clinic:
    """A service on a real store with a clock the test moves; helpers for the journey."""

    store: SqlEventStore
    service: PatientService
    clock: FixedClock

    def admit(self) -> str:
        self.clock.advance(minutes=5)
        result = self.service.handle(
            c.Admit(level="3.5", site="site-a", age_group="adult", assessment=assessment("001040"))
        )
        return result.stream_id

    def reassess(self, key: str) -> str:
        self.clock.advance(minutes=5)
        result = self.service.handle(
            c.RecordReassessment(patient_key=key, assessment=assessment("001030"))
        )
        return str(result.events[0].event_id)

    def consent(
        self,
        key: str,
        org: str,
        consent_id: str,
        *,
        expires_on: dt.date | None = None,
        purposes: Sequence[ConsentPurpose] = (ConsentPurpose.TREATMENT,),
    ) -> str:
        self.clock.advance(minutes=5)
        result = self.service.handle(
            c.GiveConsent(
                patient_key=key,
                consent_id=consent_id,
                recipient_org=org,
                purposes=list(purposes),
                expires_on=expires_on,
                document_ref=f"form-{consent_id}",
            )
        )
        return str(result.events[0].event_id)

    def revoke(self, key: str, consent_id: str) -> str:
        self.clock.advance(minutes=5)
        result = self.service.handle(c.RevokeConsent(patient_key=key, consent_id=consent_id))
        return str(result.events[0].event_id)


@pytest.fixture
def clinic(engine: Engine, policies: PolicyRegistry) -> Clinic:
    store = SqlEventStore(engine)
    clock = FixedClock(NOW)
    return Clinic(store, PatientService(store, policies, clock), clock)


def publisher_for(
    clinic: Clinic,
    engine: Engine,
    info: BrokerInfo,
    org: str,
    *,
    record: DisclosureRecord | None = None,
    batch_size: int = 3,
) -> DisclosurePublisher:
    topic = create_topic(info.bootstrap_servers, disclosure_topic(org), partitions=3)
    channel = KafkaDisclosureChannel(settings_for(info), topic, org)
    return DisclosurePublisher(
        clinic.store,
        record or SqlDisclosureRecord(engine),
        channel,
        org=org,
        batch_size=batch_size,
    )


def disclose(publisher: DisclosurePublisher) -> int:
    try:
        return publisher.drain()
    finally:
        publisher.channel.close()


def read_topic(info: BrokerInfo, org: str, expected: int) -> list[Record]:
    return consume_all(info.bootstrap_servers, disclosure_topic(org), expected, timeout=20)


def wire_by_id(store: SqlEventStore) -> dict[str, tuple[int, bytes]]:
    return {w.event_id: (w.position, w.value) for w in store.iter_wire()}


def assert_record_matches_topic(
    records: list[Record], rows: list[Disclosure], org: str, store: SqlEventStore
) -> None:
    """Every message has exactly one row and every row exactly one message."""
    wires = wire_by_id(store)
    messages = {(r.partition, r.offset): dict(r.headers)["event_id"].decode() for r in records}
    recorded = {(d.partition, d.offset): d for d in rows}
    assert set(messages) == set(recorded), "messages and disclosure rows differ"
    assert len(rows) == len(recorded), "a message is recorded twice"
    for where, event_id in messages.items():
        row = recorded[where]
        assert row.event_id == event_id
        assert row.org == org
        assert row.topic == disclosure_topic(org)
        assert row.position == wires[event_id][0]
    for record in records:
        headers = dict(record.headers)
        assert (
            headers["consent-id"].decode() == recorded[(record.partition, record.offset)].consent_id
        )


def ids_on(records: list[Record]) -> list[str]:
    ordered = sorted(records, key=lambda r: int(_body_position(r)))
    return [dict(r.headers)["event_id"].decode() for r in ordered]


def _body_position(record: Record) -> int:
    import json

    assert record.value is not None
    return int(json.loads(record.value)["position"])


# -- who receives what ----------------------------------------------------------------------


def test_only_consented_patients_events_from_the_consent_on_with_the_part2_headers(
    engine: Engine, clinic: Clinic, kafka_broker: BrokerInfo
) -> None:
    org, other = new_org("hie"), new_org("payer")
    consenting = clinic.admit()
    before = [clinic.reassess(consenting)]  # before the consent: never disclosed
    silent = clinic.admit()  # no consent at all
    elsewhere = clinic.admit()  # consents only to the other organization
    given = clinic.consent(consenting, org, "c-hie-1", purposes=list(ConsentPurpose))
    after = [clinic.reassess(consenting), clinic.reassess(silent)]
    other_consent = clinic.consent(consenting, other, "c-payer-1")  # to another org: never here
    clinic.consent(elsewhere, other, "c-payer-2")
    after += [clinic.reassess(elsewhere), clinic.reassess(consenting)]

    nobody = new_org("none")  # an organization nobody consented to
    assert disclose(publisher_for(clinic, engine, kafka_broker, nobody)) == 0
    assert read_topic(kafka_broker, nobody, 0) == []
    assert SqlDisclosureRecord(engine).query(org=nobody) == []

    publisher = publisher_for(clinic, engine, kafka_broker, org)
    expected = [given, after[0], after[3]]
    assert disclose(publisher) == len(expected)
    assert publisher.stats.checkpoint == clinic.store.head_position()

    records = read_topic(kafka_broker, org, len(expected))
    assert ids_on(records) == expected
    assert not set(before) & set(ids_on(records))
    assert other_consent not in ids_on(records)
    wires = wire_by_id(clinic.store)
    for record in records:
        headers = dict(record.headers)
        event_id = headers["event_id"].decode()
        assert record.key == consenting.encode()
        assert record.value == wires[event_id][1], "the value is the canonical wire form"
        assert headers["security-label"] == b"42CFRPart2"
        assert headers["confidentiality"] == b"R"
        assert headers["content-type"] == b"application/json"
        assert headers["part2-notice"] == PART2_NOTICE.encode()
        assert PART2_NOTICE == (
            "42 CFR part 2 prohibits unauthorized use or disclosure of these records."
        )
        assert headers["consent-id"] == b"c-hie-1"
        assert headers["consent-purposes"] == b"treatment,payment,health_care_operations"
        assert headers["recipient-org"] == org.encode()
    rows = SqlDisclosureRecord(engine).query(org=org)
    assert_record_matches_topic(records, rows, org, clinic.store)
    assert {row.patient_key for row in rows} == {consenting}


def test_revocation_stops_what_follows_and_what_was_sent_stays(
    engine: Engine, clinic: Clinic, kafka_broker: BrokerInfo
) -> None:
    org = new_org("hie")
    key = clinic.admit()
    given = clinic.consent(key, org, "c-1")
    sent_before = [given, clinic.reassess(key)]
    publisher = publisher_for(clinic, engine, kafka_broker, org)
    assert publisher.drain() == 2

    revoked = clinic.revoke(key, "c-1")  # the recipient is told: the last message under c-1
    after_revoke = [clinic.reassess(key), clinic.reassess(key)]
    assert publisher.drain() == 1
    records = read_topic(kafka_broker, org, 3)
    assert ids_on(records) == [*sent_before, revoked]
    assert not set(after_revoke) & set(ids_on(records))

    # A new consent opens disclosure again, from itself on, under its own id.
    again = clinic.consent(key, org, "c-2")
    later = clinic.reassess(key)
    assert publisher.drain() == 2
    publisher.channel.close()
    records = read_topic(kafka_broker, org, 5)
    assert ids_on(records) == [*sent_before, revoked, again, later]
    consent_of = {
        dict(r.headers)["event_id"].decode(): dict(r.headers)["consent-id"] for r in records
    }
    assert consent_of[revoked] == b"c-1"
    assert consent_of[later] == b"c-2"
    assert_record_matches_topic(
        records, SqlDisclosureRecord(engine).query(org=org), org, clinic.store
    )


def test_an_expired_consent_discloses_nothing_recorded_after_its_last_day(
    engine: Engine, clinic: Clinic, kafka_broker: BrokerInfo
) -> None:
    org = new_org("hie")
    key = clinic.admit()
    given = clinic.consent(key, org, "c-1", expires_on=NOW.date() + dt.timedelta(days=1))
    clinic.clock.advance(days=1)  # its last day: still in force
    last_day = clinic.reassess(key)
    clinic.clock.advance(days=1)
    expired = clinic.reassess(key)
    assert disclose(publisher_for(clinic, engine, kafka_broker, org)) == 2
    records = read_topic(kafka_broker, org, 2)
    assert ids_on(records) == [given, last_day]
    assert expired not in ids_on(records)


# -- crashes and restarts -------------------------------------------------------------------


class DatabaseDownOnce(DisclosureRecord):
    """The real SQL record, whose write fails once (the database went away after the broker
    acknowledged a batch: the crash window)."""

    def __init__(self, inner: SqlDisclosureRecord, fail_on_call: int) -> None:
        self.inner = inner
        self.calls = 0
        self.fail_on_call = fail_on_call

    def record(
        self, disclosures: Sequence[Disclosure], *, checkpoint: str, expected: int, position: int
    ) -> None:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise ConnectionError("database unreachable (simulated)")
        self.inner.record(disclosures, checkpoint=checkpoint, expected=expected, position=position)

    def checkpoint(self, name: str) -> int:
        return self.inner.checkpoint(name)

    def last_offsets(self, org: str, topic: str) -> dict[int, int]:
        return self.inner.last_offsets(org, topic)

    def query(self, **filters: Any) -> list[Disclosure]:
        return self.inner.query(**filters)


def test_a_crash_after_the_ack_loses_no_record_and_sends_nothing_twice(
    engine: Engine, clinic: Clinic, kafka_broker: BrokerInfo
) -> None:
    org = new_org("hie")
    keys = [clinic.admit() for _ in range(4)]
    for n, key in enumerate(keys[:3]):
        clinic.consent(key, org, f"c-{n}")
    for _ in range(3):
        for key in keys:
            clinic.reassess(key)
    expected_count = 3 + 3 * 3
    sql = SqlDisclosureRecord(engine)
    crashing = publisher_for(
        clinic, engine, kafka_broker, org, record=DatabaseDownOnce(sql, fail_on_call=3)
    )
    with pytest.raises(ConnectionError):
        disclose(crashing)  # batches 1-2 recorded; batch 3 acknowledged, then the crash
    checkpoint = sql.checkpoint(f"disclosure:{org}")
    assert 0 < checkpoint < clinic.store.head_position()
    unrecorded = len(read_topic(kafka_broker, org, 1)) - len(sql.query(org=org))
    assert unrecorded > 0, "the crash must leave acknowledged messages unrecorded"

    recorded_before = len(sql.query(org=org))
    restarted = publisher_for(clinic, engine, kafka_broker, org)
    assert disclose(restarted) == expected_count - recorded_before
    assert restarted.stats.recovered == unrecorded
    assert restarted.stats.foreign == 0
    records = read_topic(kafka_broker, org, expected_count)
    assert len(records) == expected_count, "nothing sent twice"
    assert len(set(ids_on(records))) == expected_count
    assert_record_matches_topic(records, sql.query(org=org), org, clinic.store)
    assert sql.checkpoint(f"disclosure:{org}") == clinic.store.head_position()


class StopAfterFirstRecord(DatabaseDownOnce):
    """The real SQL record; once it has recorded one batch it sets `stop`."""

    def __init__(self, inner: SqlDisclosureRecord, stop: threading.Event) -> None:
        super().__init__(inner, fail_on_call=0)
        self.stop = stop

    def record(
        self, disclosures: Sequence[Disclosure], *, checkpoint: str, expected: int, position: int
    ) -> None:
        super().record(disclosures, checkpoint=checkpoint, expected=expected, position=position)
        self.stop.set()


def test_drain_stops_between_batches_when_asked_and_resumes_from_its_checkpoint(
    engine: Engine, clinic: Clinic, kafka_broker: BrokerInfo
) -> None:
    org = new_org("hie")
    keys = []
    for n in range(3):
        keys.append(clinic.admit())
        clinic.consent(keys[-1], org, f"c-{n}")
    for key in keys:
        clinic.reassess(key)
    expected = 6  # three consents given and three reassessments; the admissions came before
    sql = SqlDisclosureRecord(engine)
    stop = threading.Event()
    stopping = publisher_for(
        clinic, engine, kafka_broker, org, record=StopAfterFirstRecord(sql, stop)
    )
    try:
        first = stopping.drain(stop)  # batch_size 3: one batch, then stop
    finally:
        stopping.channel.close()
    assert 0 < first < expected
    assert len(sql.query(org=org)) == first
    assert 0 < sql.checkpoint(f"disclosure:{org}") < clinic.store.head_position()

    assert disclose(publisher_for(clinic, engine, kafka_broker, org)) == expected - first
    records = read_topic(kafka_broker, org, expected)
    assert len(records) == expected, "nothing lost, nothing sent twice"
    assert len(set(ids_on(records))) == expected
    assert sql.checkpoint(f"disclosure:{org}") == clinic.store.head_position()


def test_a_second_publisher_for_the_same_organization_records_nothing(
    engine: Engine, clinic: Clinic, kafka_broker: BrokerInfo
) -> None:
    from continuum.application.disclosure import DisclosureConflict

    org = new_org("hie")
    key = clinic.admit()
    clinic.consent(key, org, "c-1")
    first = publisher_for(clinic, engine, kafka_broker, org)
    second = publisher_for(clinic, engine, kafka_broker, org)
    first.start()
    second.start()  # both start at checkpoint 0
    assert disclose(first) == 1
    with pytest.raises(DisclosureConflict):
        disclose(second)
    assert len(SqlDisclosureRecord(engine).query(org=org)) == 1


def test_the_disclosure_record_refuses_update_and_delete(
    engine: Engine, clinic: Clinic, kafka_broker: BrokerInfo
) -> None:
    org = new_org("hie")
    key = clinic.admit()
    clinic.consent(key, org, "c-1")
    assert disclose(publisher_for(clinic, engine, kafka_broker, org)) == 1
    for statement in ("UPDATE disclosures SET consent_id = 'forged'", "DELETE FROM disclosures"):
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    assert [d.consent_id for d in SqlDisclosureRecord(engine).query(org=org)] == ["c-1"]


# -- the CLI, killed mid-way and restarted ----------------------------------------------------


def _schema_of(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(text("SELECT current_schema()")))


def wait_for(condition: Any, what: str, timeout: float = HANG_GUARD) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def expected_disclosures(store: SqlEventStore, org: str) -> list[str]:
    """What the rules say ORG receives, computed straight from the events (not the book)."""
    active: dict[str, list[tuple[str, dt.date | None]]] = {}
    due = []
    for event in store.iter_all():
        held = active.setdefault(event.stream_id, [])
        data: Any = event.data
        recorded_on = event.recorded_at.astimezone(dt.UTC).date()
        mine = event.event_type in ("ConsentGiven", "ConsentRevoked")
        if mine and data.recipient_org != org:
            continue
        if event.event_type == "ConsentGiven":
            held.append((data.consent_id, data.expires_on))
        if any(exp is None or recorded_on <= exp for _, exp in held):
            due.append(str(event.event_id))
        if event.event_type == "ConsentRevoked":
            held[:] = [h for h in held if h[0] != data.consent_id]
    return due


@pytest.mark.postgres
def test_disclose_killed_mid_way_and_restarted_misses_nothing(
    pg_engine: Engine, pg_url: str, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    store = SqlEventStore(pg_engine)
    clock = FixedClock(dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC))
    simulate_cohort(PatientService(store, policies, clock), patients=150, days=90, seed=31)
    org = "hie-north"  # one of the simulator's organizations
    due = expected_disclosures(store, org)
    assert len(due) > 100, "the cohort must give the test something to disclose"
    topic = create_topic(kafka_broker.bootstrap_servers, unique_topic(), partitions=3)
    env = {
        **os.environ,
        **kafka_broker.settings_env(),
        "CONTINUUM_DATABASE_URL": f"{pg_url}?options=-csearch_path%3D{_schema_of(pg_engine)}",
        "CONTINUUM_RELAY_BATCH_SIZE": "40",
    }
    exe = str(Path(sys.executable).parent / "continuum")
    record = SqlDisclosureRecord(pg_engine)
    name = f"disclosure:{org}"
    command = [exe, "disclose", "--org", org, "--topic", topic]
    running = subprocess.Popen(
        [*command, "--follow"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: record.checkpoint(name) > 0, "the publisher to record a first batch")
        os.kill(running.pid, signal.SIGKILL)
        running.wait(HANG_GUARD)
    finally:
        if running.poll() is None:
            running.kill()
        running.communicate(timeout=HANG_GUARD)
    killed_at = record.checkpoint(name)
    assert 0 < killed_at < store.head_position(), "kill it mid-way, or the test proves nothing"

    again = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=HANG_GUARD, check=False
    )
    assert again.returncode == 0, again.stderr
    assert "disclosed " in again.stdout
    assert record.checkpoint(name) == store.head_position()
    records = consume_all(kafka_broker.bootstrap_servers, topic, len(due), timeout=30)
    wires = wire_by_id(store)
    seen: dict[str, bytes] = {}
    for r in records:
        event_id = dict(r.headers)["event_id"].decode()
        assert r.value == wires[event_id][1]
        assert seen.setdefault(event_id, r.value) == r.value, "a re-send is byte-identical"
    assert set(seen) == set(due), "no loss, nothing undue"
    rows = record.query(org=org, limit=100_000)
    assert {(d.partition, d.offset) for d in rows} == {(r.partition, r.offset) for r in records}
    assert {d.event_id for d in rows} == set(due)


def unique_topic() -> str:
    return f"continuum.disclosure.kill-{uuid.uuid4().hex[:10]}.v1"


def test_disclose_cli_creates_the_topic_and_reports(
    tmp_path: Path, kafka_broker: BrokerInfo, policies: PolicyRegistry
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    env = {**kafka_broker.settings_env(), "CONTINUUM_DATABASE_URL": url}
    org = new_org("hie")
    runner = CliRunner()
    missing = runner.invoke(app, ["disclose", "--org", org], env=env)
    assert missing.exit_code == 8, missing.output
    assert f"topic {disclosure_topic(org)} does not exist" in missing.stderr
    malformed = runner.invoke(app, ["disclose", "--org", "Not_An_Org"], env=env)
    assert malformed.exit_code == 3, malformed.output
    assert "consent.org_malformed" in malformed.stderr

    from continuum.adapters.sql.database import create_database_engine
    from continuum.adapters.sql.migrate import upgrade

    engine = create_database_engine(url)
    try:
        upgrade(engine)
        store, clock = SqlEventStore(engine), FixedClock(NOW)
        clinic = Clinic(store, PatientService(store, policies, clock), clock)
        key = clinic.admit()
        clinic.consent(key, org, "c-1")
        clinic.reassess(key)
    finally:
        engine.dispose()
    first = runner.invoke(app, ["disclose", "--org", org, "--create-topic"], env=env)
    assert first.exit_code == 0, first.stderr
    assert f"disclosed 2 events to {org} on {disclosure_topic(org)}; checkpoint 3" in first.stdout
    again = runner.invoke(app, ["disclose", "--org", org], env=env)
    assert again.exit_code == 0, again.stderr
    assert "disclosed 0 events" in again.stdout
    listed = runner.invoke(app, ["consent", "list", key], env=env)
    assert listed.exit_code == 0, listed.stderr
    assert "c-1 to " + org in listed.stdout
    assert "2 disclosed" in listed.stdout
    assert len(read_topic(kafka_broker, org, 2)) == 2


def test_threading_stop_ends_follow_mode(
    engine: Engine, clinic: Clinic, kafka_broker: BrokerInfo
) -> None:
    """`run` keeps disclosing new events until stopped (SQLite polls, PostgreSQL listens)."""
    from continuum.application.relay import PollingWaiter

    org = new_org("hie")
    key = clinic.admit()
    clinic.consent(key, org, "c-1")
    publisher = publisher_for(clinic, engine, kafka_broker, org)
    publisher.waiter = PollingWaiter(0.05)
    publisher.idle_timeout = 0.05
    stop = threading.Event()
    worker = threading.Thread(target=publisher.run, args=(stop,), daemon=True)
    worker.start()
    try:
        wait_for(lambda: publisher.stats.disclosed == 1, "the consent to be disclosed")
        clinic.reassess(key)
        wait_for(lambda: publisher.stats.disclosed == 2, "the new event to be disclosed")
    finally:
        stop.set()
        worker.join(HANG_GUARD)
        publisher.channel.close()
    assert not worker.is_alive()
    assert len(read_topic(kafka_broker, org, 2)) == 2
