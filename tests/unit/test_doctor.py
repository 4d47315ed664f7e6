"""continuum.application.doctor over fake probes: each check's verdict, message and fix, the
lag thresholds, and the order in which failures skip what depends on them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import pytest

from continuum.application import doctor as d
from continuum.entrypoints.doctor_cli import render_text
from continuum.settings import Settings

HEAD = "0006_x"
KNOWN = frozenset({"0005_y", HEAD})


@dataclass
class FakeDb:
    where: str = "postgresql://u@db/x"
    auto_migrates: bool = False
    revision: str | None = HEAD
    head: int = 0
    saved: dict[str, int] = field(default_factory=dict)
    down: bool = False

    def ping(self) -> None:
        if self.down:
            raise ConnectionRefusedError("connection refused")

    def schema_revision(self) -> str | None:
        if self.down:
            raise ConnectionRefusedError("connection refused")
        return self.revision

    def head_position(self) -> int:
        return self.head

    def checkpoint(self, name: str) -> int | None:
        return self.saved.get(name)


@dataclass
class FakeReadModel:
    where: str = "postgresql://u@db/x"
    fed_by: str | None = None
    saved: dict[str, int] = field(default_factory=dict)
    broken: bool = False

    def source(self) -> str | None:
        if self.broken:
            raise RuntimeError("no such table")
        return self.fed_by

    def checkpoints(self, prefix: str) -> dict[str, int]:
        return {k: v for k, v in self.saved.items() if k.startswith(prefix)}


@dataclass
class FakeBroker:
    bootstrap: str = "kafka:9092"
    topics: dict[str, int] = field(default_factory=dict)
    ends: dict[str, dict[int, int]] = field(default_factory=dict)
    groups: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    down: bool = False

    def cluster(self) -> d.ClusterInfo:
        if self.down:
            raise TimeoutError("Unable to bootstrap from ['kafka:9092']")
        return d.ClusterInfo("c-1", 1)

    def partitions(self, topics: Collection[str]) -> dict[str, int]:
        return {t: n for t, n in self.topics.items() if t in topics}

    def end_offsets(self, topic: str) -> dict[int, int]:
        return self.ends.get(topic, {})

    def committed(self, group: str, topic: str) -> dict[int, int]:
        return self.groups.get((group, topic), {})


def settings(**values: object) -> Settings:
    return Settings(database_url="postgresql://u@db/x", auth_mode="dev", **values)  # type: ignore[arg-type]


# -- configuration -----------------------------------------------------------------------------


def test_config_names_the_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTINUUM_API_PORT", "99999")
    result, loaded = d.check_config(Settings, {})
    assert loaded is None
    assert result.status is d.Status.FAIL
    assert "CONTINUUM_API_PORT" in result.summary
    assert result.fix


def test_config_names_an_unparseable_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTINUUM_POLICY_DIRS", "not json")
    result, loaded = d.check_config(Settings, {})
    assert (result.status, loaded) == (d.Status.FAIL, None)
    assert "CONTINUUM_POLICY_DIRS" in result.summary
    assert result.fix is not None and "JSON" in result.fix


def test_config_reports_a_cross_field_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTINUUM_AUTH_MODE", "oidc")
    monkeypatch.delenv("CONTINUUM_AUTH_ISSUER", raising=False)
    result, _ = d.check_config(Settings, {})
    assert result.status is d.Status.FAIL
    assert "CONTINUUM_AUTH_ISSUER" in result.summary


def test_config_warns_of_a_variable_that_is_no_setting() -> None:
    env = {"CONTINUUM_DATABSE_URL": "x", "CONTINUUM_TEST_DATABASE_URL": "y", "OTHER": "z"}
    result, loaded = d.check_config(settings, env)
    assert loaded is not None
    assert result.status is d.Status.WARN
    assert "CONTINUUM_DATABSE_URL (did you mean CONTINUUM_DATABASE_URL?)" in result.summary
    assert "TEST_DATABASE_URL" not in result.summary


def test_config_warns_of_the_development_issuer_and_passes_oidc() -> None:
    dev, _ = d.check_config(settings, {})
    assert dev.status is d.Status.WARN and dev.fix and "CONTINUUM_AUTH_MODE=oidc" in dev.fix
    oidc, _ = d.check_config(
        lambda: Settings(auth_mode="oidc", auth_issuer="https://login.example.org/realms/c"), {}
    )
    assert oidc.status is d.Status.OK


# -- database and schema -----------------------------------------------------------------------


def test_database_down_says_which_variable() -> None:
    result = d.check_database(FakeDb(down=True))
    assert result.status is d.Status.FAIL
    assert "connection refused" in result.summary and "postgresql://u@db/x" in result.summary
    assert result.fix and "CONTINUUM_DATABASE_URL" in result.fix
    assert d.check_database(FakeDb()).status is d.Status.OK


@pytest.mark.parametrize(
    ("db", "status", "words"),
    [
        (FakeDb(revision=None), d.Status.FAIL, "continuum db upgrade"),
        (FakeDb(revision="0005_y"), d.Status.FAIL, "continuum db upgrade"),
        (FakeDb(revision="0099_future"), d.Status.FAIL, "release"),
        (FakeDb(revision=None, auto_migrates=True), d.Status.WARN, "nothing needed"),
        (FakeDb(down=True), d.Status.FAIL, "may read"),
        (FakeDb(), d.Status.OK, None),
    ],
)
def test_schema(db: FakeDb, status: d.Status, words: str | None) -> None:
    result = d.check_schema(db, HEAD, KNOWN)
    assert result.status is status, result
    if words is None:
        assert result.fix is None
    else:
        assert result.fix is not None and words in result.fix


# -- lag ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "saved", "status", "lag"),
    [
        (0, None, d.Status.OK, None),
        (5, None, d.Status.WARN, 5),
        (50, None, d.Status.FAIL, 50),
        (20, 20, d.Status.OK, 0),
        (20, 15, d.Status.WARN, 5),
        (40, 15, d.Status.FAIL, 25),
        (10, 12, d.Status.FAIL, None),
    ],
)
def test_relay_lag(head: int, saved: int | None, status: d.Status, lag: int | None) -> None:
    db = FakeDb(head=head, saved={} if saved is None else {"relay:ev": saved})
    result = d.check_relay(db, "ev", max_lag=10)
    assert result.status is status, result
    assert result.details.get("lag") == lag
    if status is not d.Status.OK:
        assert result.fix


def test_relay_lag_fix_names_the_command() -> None:
    result = d.check_relay(FakeDb(head=3, saved={"relay:ev": 1}), "ev", max_lag=10)
    assert result.fix is not None and "`continuum relay`" in result.fix
    assert "2 behind" in result.summary


def test_group_lag() -> None:
    broker = FakeBroker(ends={"ev": {0: 10, 1: 5}}, groups={("g", "ev"): {0: 10, 1: 2}})
    result = d.check_group_lag(broker, "g", "ev", 10, "`continuum project`")
    assert (result.status, result.details["lag"]) == (d.Status.WARN, 3)
    assert result.fix and "`continuum project`" in result.fix
    assert d.check_group_lag(broker, "g", "ev", 2, "x").status is d.Status.FAIL
    broker.groups[("g", "ev")] = {0: 10, 1: 5}
    assert d.check_group_lag(broker, "g", "ev", 0, "x").status is d.Status.OK


def test_group_that_never_committed() -> None:
    broker = FakeBroker(ends={"ev": {0: 4}})
    waiting = d.check_group_lag(broker, "g", "ev", 10, "`continuum ingest`")
    assert waiting.status is d.Status.WARN and "committed no offsets" in waiting.summary
    assert waiting.fix == "start `continuum ingest`"
    unused = d.check_group_lag(broker, "g", "ev", 10, "x", expected=False)
    assert unused.status is d.Status.SKIP
    empty = d.check_group_lag(FakeBroker(ends={"ev": {0: 0}}), "g", "ev", 10, "x")
    assert empty.status is d.Status.OK


def test_group_lag_when_offsets_cannot_be_read() -> None:
    class Failing(FakeBroker):
        def end_offsets(self, topic: str) -> dict[int, int]:
            raise PermissionError("GroupAuthorizationFailed")

    result = d.check_group_lag(Failing(), "g", "ev", 10, "x")
    assert result.status is d.Status.FAIL and "GroupAuthorizationFailed" in result.summary


# -- topics ------------------------------------------------------------------------------------


def test_topics_missing_short_and_fine() -> None:
    specs = d.topic_specs(settings(), d.Options(partitions=6))
    assert [s.name for s in specs] == [
        "continuum.events.v1",
        "hospital.adt.v1",
        "hospital.adt.v1.dlq",
    ]
    broker = FakeBroker(topics={"continuum.events.v1": 6, "hospital.adt.v1": 3})
    events, adt, dlq = d.check_topics(broker, specs)
    assert events.status is d.Status.OK
    assert adt.status is d.Status.WARN and "3 partitions, expected 6" in adt.summary
    assert dlq.status is d.Status.FAIL
    assert dlq.fix is not None
    assert dlq.fix.startswith("create topic hospital.adt.v1.dlq with 6 partitions: ")
    assert "`continuum ingest --create-topic --partitions 6 --replication-factor 1`" in dlq.fix
    assert "kafka-topics.sh --bootstrap-server kafka:9092 --create" in dlq.fix
    no_ingest = d.topic_specs(settings(), d.Options(ingest=False, partitions=3))
    assert [(s.name, s.partitions) for s in no_ingest] == [("continuum.events.v1", 3)]


def test_topics_that_cannot_be_described() -> None:
    class Failing(FakeBroker):
        def partitions(self, topics: Collection[str]) -> dict[str, int]:
            raise PermissionError("TopicAuthorizationFailed")

    specs = d.topic_specs(settings(), d.Options(ingest=False))
    (result,) = d.check_topics(Failing(), specs)
    assert result.status is d.Status.FAIL and result.fix and "DESCRIBE" in result.fix


# -- projections -------------------------------------------------------------------------------


def test_projections_from_the_store() -> None:
    db = FakeDb(head=30)
    model = FakeReadModel(fed_by="store", saved={"store": 25})
    result = d.check_projections(model, db, None, max_lag=10)
    assert (result.status, result.details["lag"]) == (d.Status.WARN, 5)
    assert result.fix and "continuum project --follow" in result.fix
    model.saved["store"] = 30
    assert d.check_projections(model, db, None, 10).status is d.Status.OK
    model.saved["store"] = 0
    assert d.check_projections(model, db, None, 10).status is d.Status.FAIL


def test_projections_from_kafka() -> None:
    model = FakeReadModel(fed_by="kafka:ev", saved={"kafka:ev:0": 4, "kafka:ev:1": 6})
    broker = FakeBroker(ends={"ev": {0: 4, 1: 9}})
    result = d.check_projections(model, FakeDb(), broker, 10)
    assert (result.status, result.details["lag"]) == (d.Status.WARN, 3)
    assert result.fix and "--source kafka --follow" in result.fix
    assert d.check_projections(model, FakeDb(), None, 10).status is d.Status.SKIP


@pytest.mark.parametrize(
    ("model", "status"),
    [
        (FakeReadModel(fed_by=None), d.Status.WARN),
        (FakeReadModel(fed_by="store as of 2026-01-01T00:00:00+00:00"), d.Status.WARN),
        (FakeReadModel(fed_by="carrier-pigeon"), d.Status.WARN),
        (FakeReadModel(broken=True), d.Status.FAIL),
    ],
)
def test_projections_odd_states(model: FakeReadModel, status: d.Status) -> None:
    assert d.check_projections(model, FakeDb(), None, 10).status is status


def test_projections_lag_that_cannot_be_computed() -> None:
    class Failing(FakeDb):
        def head_position(self) -> int:
            raise RuntimeError("gone")

    model = FakeReadModel(fed_by="store")
    result = d.check_projections(model, Failing(), None, 10)
    assert result.status is d.Status.FAIL and "gone" in result.summary


# -- the whole diagnosis -----------------------------------------------------------------------


def _ports(db: FakeDb, model: FakeReadModel, broker: FakeBroker) -> d.Ports:
    return d.Ports(lambda _s: db, lambda _s: model, lambda _s: broker, HEAD, KNOWN)


def _kafka_settings() -> Settings:
    return settings(kafka_bootstrap_servers="kafka:9092")


def test_diagnose_skips_what_depends_on_a_failure() -> None:
    report = d.diagnose(
        _kafka_settings,
        {},
        _ports(FakeDb(down=True), FakeReadModel(), FakeBroker(down=True)),
        d.Options(),
    )
    status = {r.name: r.status for r in report.results}
    assert status["database"] is d.Status.FAIL and status["broker"] is d.Status.FAIL
    assert status["schema"] is status["relay"] is status["projections"] is d.Status.SKIP
    assert status["topic continuum.events.v1"] is d.Status.SKIP
    assert status["group continuum-projections"] is d.Status.SKIP
    assert report.failed


def test_diagnose_without_kafka_and_with_a_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONTINUUM_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    healthy = FakeDb(head=2)
    model = FakeReadModel(fed_by="store", saved={"store": 2})
    report = d.diagnose(settings, {}, _ports(healthy, model, FakeBroker(down=True)), d.Options())
    status = {r.name: r.status for r in report.results}
    assert status["broker"] is status["topics"] is status["relay"] is d.Status.SKIP
    assert not report.failed and report.counts()["fail"] == 0
    only = d.Options(only=frozenset({d.CheckName.DATABASE}), kafka=True)
    chosen = d.diagnose(settings, {}, _ports(healthy, model, FakeBroker(down=True)), only)
    assert [r.name for r in chosen.results] == ["config", "database"]


def test_diagnose_with_an_invalid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTINUUM_EVENTS_TOPIC", "bad topic!")
    report = d.diagnose(Settings, {}, _ports(FakeDb(), FakeReadModel(), FakeBroker()), d.Options())
    assert report.results[0].status is d.Status.FAIL
    assert "CONTINUUM_EVENTS_TOPIC" in report.results[0].summary
    assert {r.status for r in report.results[1:]} == {d.Status.SKIP}
    lines = render_text(report)
    assert lines[0].startswith("FAIL  config")
    assert any("fix: correct the variable" in line for line in lines)
    assert lines[-1] == "0 ok, 0 warn, 1 fail, 7 skip"
