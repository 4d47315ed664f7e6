"""`continuum ingest` against a real Kafka-protocol broker and a real SQL store.

What the issue asks to see: every ADT trigger from real-looking HL7 v2 messages (and the JSON
form) end to end into the store; a redelivered message (the same control id produced twice,
and a consumer restarted from an uncommitted offset) changes nothing; a malformed message and
an unmappable location land in `<topic>.dlq` with the reason in headers while the good
messages after them are processed; offsets are committed only after the commands committed;
configuration errors are one clear line. Synthetic data only.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer, TopicPartition
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from continuum.adapters.kafka.ingest import IngestStats, KafkaIngest, dlq_topic_for
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.ports import AppendResult
from continuum.application.service import CommandContext, PatientService
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum.entrypoints.cli import app
from continuum.ingest.mapping import load_mapping
from continuum.ingest.processor import AdtIngestor
from continuum.settings import Settings
from tests.adt_samples import RATINGS_FOR, hl7, json_message
from tests.kafka_broker import BrokerInfo, admin_client, consume_all, create_topic, free_port
from tests.kafka_broker import unique_name as unique
from tests.support import FixedClock

pytestmark = pytest.mark.kafka

HANG_GUARD = 30.0  # seconds; only to turn a hang into a failure
T = dt.datetime(2026, 1, 5, 9, 0)  # naive: local time at the facility (America/Chicago)
CLOCK = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)

Message = tuple[bytes, bytes]  # (key, value)


def at(days: float, hours: float = 0) -> dt.datetime:
    return T + dt.timedelta(days=days, hours=hours)


def settings_for(info: BrokerInfo, topic: str, group: str) -> Settings:
    env = {k.removeprefix("CONTINUUM_").lower(): v for k, v in info.settings_env().items()}
    return Settings.model_validate({**env, "adt_topic": topic, "ingest_group": group})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> SqlEventStore:
    engine: Engine = request.getfixturevalue(
        f"{'pg' if request.param == 'postgres' else request.param}_engine"
    )
    return SqlEventStore(engine)


@pytest.fixture
def sqlite_store(sqlite_engine: Engine) -> SqlEventStore:
    return SqlEventStore(sqlite_engine)


@pytest.fixture
def feed(kafka_broker: BrokerInfo, kafka_topic: str) -> tuple[str, str]:
    """The feed topic (3 partitions, from the kafka_topic fixture) and its DLQ."""
    dlq = create_topic(kafka_broker.bootstrap_servers, dlq_topic_for(kafka_topic), partitions=1)
    return kafka_topic, dlq


def service_for(store: SqlEventStore, policies: PolicyRegistry) -> PatientService:
    return PatientService(store, policies, FixedClock(CLOCK))


def produce(info: BrokerInfo, topic: str, messages: list[Message]) -> dict[int, int]:
    """Send in order; return each partition's end offset."""
    producer = KafkaProducer(
        bootstrap_servers=info.bootstrap_servers, acks="all", client_id=unique("tests-hospital")
    )
    ends: dict[int, int] = {}
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in messages]
        producer.flush(timeout=HANG_GUARD)
        for future in futures:
            meta = future.get(timeout=HANG_GUARD)
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        producer.close(timeout=5)
    return ends


def run_ingest(
    settings: Settings,
    service: PatientService,
    expected: int,
    *,
    kind: type[KafkaIngest] = KafkaIngest,
) -> IngestStats:
    """Consume exactly `expected` messages (the hang guard turns a stall into a failure)."""
    runner = kind(settings, AdtIngestor(service, load_mapping()))
    stop = threading.Event()
    guard = threading.Timer(HANG_GUARD, stop.set)
    guard.start()
    try:
        stats = runner.run(stop, max_messages=expected)
    finally:
        guard.cancel()
        runner.close()
    assert not stop.is_set(), f"ingest stalled: {stats.line()}"
    assert stats.consumed == expected
    return stats


def committed(info: BrokerInfo, group: str, topic: str) -> dict[int, int]:
    admin = admin_client(info.bootstrap_servers)
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


def event_types(store: SqlEventStore, mrn: str) -> list[str]:
    key = store.patient_key_for_mrn(mrn)
    assert key is not None, f"{mrn} was not admitted"
    return [e.event_type for e in store.read_stream(key)]


def hl7_msg(trigger: str, control_id: str, when: dt.datetime, **kw: Any) -> Message:
    mrn = kw.get("mrn", "SIM0001")
    return mrn.encode(), hl7(trigger, control_id, when, **kw).encode()


# -- every trigger, end to end -----------------------------------------------------------------


def every_trigger() -> list[Message]:
    """Three synthetic patients whose journeys use all ten triggers."""
    one = {"mrn": "SIM0001"}
    two = {"mrn": "SIM0002", "family": "TESTPATIENT", "given": "BRAVO"}
    three = {"mrn": "SIM0003", "family": "TESTPATIENT", "given": "CHARLIE"}
    r = RATINGS_FOR
    return [
        hl7_msg("A01", "E1", at(0), location="SIM-RES35", ratings=r["3.5"], **one),
        hl7_msg("A02", "E2", at(2), location="SIM-INP37", ratings=r["3.7"], **one),
        hl7_msg("A12", "E3", at(2, 2), **one),
        hl7_msg("A03", "E4", at(5), disposition="07", discharge_time=at(5), **one),
        hl7_msg("A04", "E5", at(0), location="SIM-OP", ratings=r["1"], hours=4, **two),
        hl7_msg("A06", "E6", at(3), location="SIM-RES35", ratings=r["3.5"], **two),
        hl7_msg("A07", "E7", at(6), location="SIM-IOP", ratings=r["2.1"], hours=12, **two),
        hl7_msg("A03", "E8", at(9), disposition="20", **two),
        hl7_msg("A13", "E9", at(9, 1), **two),
        hl7_msg("A01", "E10", at(1), location="SIM-WM37", ratings=r["3.7-WM"], **three),
        hl7_msg("A08", "E11", at(1, 3), **{**three, "given": "DELTA"}),
        hl7_msg("A11", "E12", at(1, 4), **three),
        (b"SIM0003", json_message("A01", "E13", at(2), mrn="SIM0003", ratings=r["3.5"])),
    ]


def test_every_trigger_end_to_end(
    kafka_broker: BrokerInfo,
    feed: tuple[str, str],
    store: SqlEventStore,
    policies: PolicyRegistry,
) -> None:
    topic, dlq = feed
    group = unique("ingest")
    messages = every_trigger()
    ends = produce(kafka_broker, topic, messages)
    stats = run_ingest(settings_for(kafka_broker, topic, group), service_for(store, policies), 13)

    assert (stats.applied, stats.dead_lettered, stats.duplicates) == (13, 0, 0)
    assert event_types(store, "SIM0001") == [
        "PatientAdmitted",
        "ReassessmentRecorded",
        "LevelTransitioned",
        "EventVoided",
        "PatientDischarged",
    ]
    one: list[Any] = store.read_stream(store.patient_key_for_mrn("SIM0001") or "")
    assert one[3].data.voided_event_id == one[2].event_id
    discharge: Any = one[4].data
    assert (discharge.from_level, discharge.reason.value, discharge.disposition.value) == (
        "3.5",
        "dropped_out",
        "aadvice",
    )
    assert event_types(store, "SIM0002") == [
        "PatientAdmitted",
        "ReassessmentRecorded",
        "LevelTransitioned",
        "ReassessmentRecorded",
        "LevelTransitioned",
        "PatientDischarged",
        "EventVoided",
    ]
    two: list[Any] = store.read_stream(store.patient_key_for_mrn("SIM0002") or "")
    moves = [(e.data.from_level, e.data.placement.level) for e in (two[2], two[4])]
    assert moves == [("1", "3.5"), ("3.5", "2.1")]
    assert (two[5].data.reason.value, two[5].data.disposition.value) == ("death", "exp")
    assert event_types(store, "SIM0003") == ["PatientAdmitted", "EventVoided", "PatientAdmitted"]
    key3 = store.patient_key_for_mrn("SIM0003") or ""
    identity = store.identity(key3)
    assert identity is not None and identity.given_name == "DELTA"  # A08, no event
    for key in store.stream_ids():
        for event in store.read_stream(key):
            body = event.model_dump_json()
            assert "SIM000" not in body and "TESTPATIENT" not in body
            assert event.actor.role.value == "integration"
    assert committed(kafka_broker, group, topic) == ends
    assert consume_all(kafka_broker.bootstrap_servers, dlq, timeout=2.0) == []


# -- redelivery ---------------------------------------------------------------------------------


class CrashBeforeCommit(KafkaIngest):
    """Dies (in effect) after each message's transaction, before its offset is committed."""

    def _commit(self, offsets: dict[TopicPartition, Any]) -> None:
        return None


def test_redelivered_messages_change_nothing(
    kafka_broker: BrokerInfo,
    feed: tuple[str, str],
    sqlite_store: SqlEventStore,
    policies: PolicyRegistry,
) -> None:
    topic, _ = feed
    group = unique("ingest")
    settings = settings_for(kafka_broker, topic, group)
    service = service_for(sqlite_store, policies)
    admit = hl7_msg("A01", "R1", at(0), ratings=RATINGS_FOR["3.5"])
    move = hl7_msg("A02", "R2", at(1), location="SIM-INP37", ratings=RATINGS_FOR["3.7"])
    leave = hl7_msg("A03", "R3", at(3), disposition="01")
    # the hospital's interface engine re-sends: right away, and again after later messages
    produce(kafka_broker, topic, [admit, admit, move, move, leave, admit])

    first = run_ingest(settings, service, 6, kind=CrashBeforeCommit)
    assert (first.applied, first.duplicates) == (3, 3)
    assert committed(kafka_broker, group, topic) == {}
    after_first = sqlite_store.read_stream(sqlite_store.patient_key_for_mrn("SIM0001") or "")
    assert [e.event_type for e in after_first] == [
        "PatientAdmitted",
        "ReassessmentRecorded",
        "LevelTransitioned",
        "PatientDischarged",
    ]
    head = sqlite_store.head_position()

    # restarted from the uncommitted offset: everything is read again and nothing changes
    again = run_ingest(settings, service, 6)
    assert (again.applied, again.duplicates, again.dead_lettered) == (0, 6, 0)
    assert sqlite_store.read_stream(after_first[0].stream_id) == after_first
    assert sqlite_store.head_position() == head
    assert len(sqlite_store.stream_ids()) == 1
    assert sum(committed(kafka_broker, group, topic).values()) == 6


# -- dead letters -------------------------------------------------------------------------------


def test_bad_messages_go_to_the_dlq_and_the_good_ones_after_them_are_processed(
    kafka_broker: BrokerInfo,
    feed: tuple[str, str],
    sqlite_store: SqlEventStore,
    policies: PolicyRegistry,
) -> None:
    topic, dlq = feed
    group = unique("ingest")
    key = b"SIMGEN"  # one key: one partition, so "after" is well defined
    malformed = b"MSH|^~\\&|SIMADT|SIMGEN|CONTINUUM|SIMCARE|2026-01-05||ADT^A01|BAD1|P|2.5.1\rPID|1"
    unmappable = hl7("A01", "BAD2", at(0), mrn="SIM0011", location="SIM-NOWHERE", ratings="012400")
    messages: list[Message] = [
        (key, hl7("A01", "G1", at(0), mrn="SIM0010", ratings=RATINGS_FOR["3.5"]).encode()),
        (key, malformed),
        (key, unmappable.encode()),
        (key, b"not a hospital message"),
        (
            key,
            hl7("A02", "G2", at(1), mrn="SIM0010", location="SIM-INP37", ratings="003000").encode(),
        ),
        (key, json_message("A01", "G3", at(1), mrn="SIM0012", ratings=RATINGS_FOR["3.5"])),
    ]
    ends = produce(kafka_broker, topic, messages)
    (partition,) = ends
    stats = run_ingest(
        settings_for(kafka_broker, topic, group), service_for(sqlite_store, policies), 6
    )

    assert (stats.applied, stats.dead_lettered) == (3, 3)
    assert event_types(sqlite_store, "SIM0010") == [
        "PatientAdmitted",
        "ReassessmentRecorded",
        "LevelTransitioned",
    ]
    assert event_types(sqlite_store, "SIM0012") == ["PatientAdmitted"]
    assert sqlite_store.patient_key_for_mrn("SIM0011") is None
    assert committed(kafka_broker, group, topic) == ends

    dead = consume_all(kafka_broker.bootstrap_servers, dlq, expected_count=3, timeout=HANG_GUARD)
    assert [r.value for r in dead] == [malformed, unmappable.encode(), b"not a hospital message"]
    reasons = []
    for record, source_offset in zip(dead, (1, 2, 3), strict=True):
        headers = dict(record.headers)
        assert record.key == key
        assert headers["dlq-source-topic"] == topic.encode()
        assert headers["dlq-source-partition"] == str(partition).encode()
        assert headers["dlq-source-offset"] == str(source_offset).encode()
        assert 0 < len(headers["dlq-error"]) <= 500
        assert b"SIM0011" not in headers["dlq-error"] and b"TESTPATIENT" not in headers["dlq-error"]
        reasons.append((headers["dlq-reason"].decode(), headers["dlq-field"].decode()))
    assert reasons == [
        ("adt.malformed", "MSH-7"),
        ("adt.location_unmapped", "PV1-3"),
        ("adt.unknown_format", "value"),
    ]
    assert dict(dead[1].headers)["dlq-error"].startswith(b"PV1-3: location SIM-NOWHERE")


# -- offsets follow the database ---------------------------------------------------------------


class DatabaseDownOnThirdCommand(PatientService):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def handle(self, command: c.Command, ctx: CommandContext | None = None) -> AppendResult:
        self.calls += 1
        if self.calls == 3:
            raise OperationalError("INSERT INTO events ...", {}, Exception("server closed"))
        return super().handle(command, ctx)


def test_a_database_failure_is_not_committed_and_is_retried(
    kafka_broker: BrokerInfo,
    feed: tuple[str, str],
    sqlite_store: SqlEventStore,
    policies: PolicyRegistry,
) -> None:
    topic, dlq = feed
    group = unique("ingest")
    settings = settings_for(kafka_broker, topic, group)
    key = b"SIM0020"
    messages = [
        (key, hl7("A01", f"D{i}", at(i), mrn=f"SIM002{i}", ratings=RATINGS_FOR["3.5"]).encode())
        for i in range(4)
    ]
    ends = produce(kafka_broker, topic, messages)
    (partition,) = ends
    flaky = DatabaseDownOnThirdCommand(sqlite_store, policies, FixedClock(CLOCK))
    runner = KafkaIngest(settings, AdtIngestor(flaky, load_mapping()))
    stop = threading.Event()
    guard = threading.Timer(HANG_GUARD, stop.set)
    guard.start()
    try:
        with pytest.raises(OperationalError):
            runner.run(stop, max_messages=4)
    finally:
        guard.cancel()
        runner.close()
    assert committed(kafka_broker, group, topic) == {partition: 2}  # the two that committed
    assert len(sqlite_store.stream_ids()) == 2

    again = run_ingest(settings, service_for(sqlite_store, policies), 2)
    assert again.applied == 2
    assert len(sqlite_store.stream_ids()) == 4
    assert committed(kafka_broker, group, topic) == ends
    assert consume_all(kafka_broker.bootstrap_servers, dlq, timeout=2.0) == []


# -- the command line -------------------------------------------------------------------------


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"CONTINUUM_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}", **extra}


def test_cli_ingests_to_the_end_with_once(
    kafka_broker: BrokerInfo, feed: tuple[str, str], tmp_path: Path
) -> None:
    topic, _ = feed
    produce(
        kafka_broker,
        topic,
        [
            hl7_msg("A01", "C1", at(0), ratings=RATINGS_FOR["3.5"]),
            hl7_msg("A03", "C2", at(2), disposition="07"),
            hl7_msg("A01", "C3", at(0), mrn="SIM0031", location="SIM-NOWHERE", ratings="012400"),
        ],
    )
    env = cli_env(tmp_path, **kafka_broker.settings_env(), CONTINUUM_ADT_TOPIC=topic)
    args = ["ingest", "--once", "--group", unique("cli")]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "consumed 3: applied 2 (2 events), duplicates 0, unchanged 0, dead-lettered 1" in (
        result.stdout
    )


def test_cli_unreachable_broker_is_one_clear_line(tmp_path: Path) -> None:
    env = cli_env(
        tmp_path,
        CONTINUUM_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        CONTINUUM_KAFKA_CONNECT_TIMEOUT_MS="1000",
    )
    result = CliRunner().invoke(app, ["ingest", "--once"], env=env)
    assert result.exit_code == 9, result.output
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("error: cannot reach Kafka at 127.0.0.1:")
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ("absent.toml", "cannot read the ADT mapping"),
        ("bad.toml", "is not an IANA timezone"),
    ],
)
def test_cli_bad_mapping_is_a_configuration_error(
    tmp_path: Path, mapping: str, expected: str
) -> None:
    (tmp_path / "bad.toml").write_text(
        'timezone = "Mars/Olympus"\n[[locations]]\npoint_of_care = "A"\nlevel = "1"\nsite = "s"\n'
    )
    env = cli_env(tmp_path, CONTINUUM_ADT_MAPPING=str(tmp_path / mapping))
    result = CliRunner().invoke(app, ["ingest", "--once"], env=env)
    assert result.exit_code == 8, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.output


def test_cli_missing_topic_is_a_configuration_error(
    kafka_broker: BrokerInfo, tmp_path: Path
) -> None:
    topic = unique("absent")
    env = cli_env(tmp_path, **kafka_broker.settings_env(), CONTINUUM_ADT_TOPIC=topic)
    result = CliRunner().invoke(app, ["ingest", "--once"], env=env)
    assert result.exit_code == 8, result.output
    assert f"error: topic {topic} does not exist" in result.stderr
    assert "--create-topic" in result.stderr
    assert "Traceback" not in result.output
