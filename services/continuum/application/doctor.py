"""`continuum doctor`: is this deployment able to run, and is it keeping up?

Each check is a plain function over a small port (the database, the read models, the broker)
and returns a `CheckResult`: OK, WARN or FAIL (or SKIP when what it needs already failed), one
sentence saying what was found and, when something is wrong, one saying what to do about it.
The adapters behind the ports are in continuum.adapters.sql.probe and
continuum.adapters.kafka.probe; the command is continuum.entrypoints.doctor_cli.

Lag has three thresholds: none is OK; up to `max_lag` events or messages is a WARN (a running
worker catches up by itself); more is a FAIL.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pydantic import ValidationError

from continuum.settings import Settings

ENV_PREFIX = "CONTINUUM_"
#: Variables read by something other than Settings (the test suite), not typos.
OTHER_VARIABLES = frozenset({"CONTINUUM_TEST_DATABASE_URL"})
#: The relay's checkpoint name for a topic (continuum.entrypoints.cli.relay).
RELAY_CHECKPOINT = "relay:{topic}"
#: The store-fed projection runner's checkpoint, and the prefix of the Kafka runner's.
STORE_SOURCE = "store"
KAFKA_SOURCE_PREFIX = "kafka:"


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    summary: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "summary": self.summary,
            "fix": self.fix,
            "details": self.details,
        }


@dataclass(frozen=True)
class Report:
    results: list[CheckResult]

    @property
    def failed(self) -> bool:
        return any(r.status is Status.FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s.value: sum(r.status is s for r in self.results) for s in Status}

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "counts": self.counts(),
            "checks": [r.to_json_dict() for r in self.results],
        }


# -- ports -------------------------------------------------------------------------------------


class DatabaseProbe(Protocol):
    """The event store's database. Every method may raise; the checks report why."""

    @property
    def where(self) -> str:
        """The URL without its password."""
        ...

    @property
    def auto_migrates(self) -> bool:
        """True for the embedded SQLite default, which migrates itself on first use."""
        ...

    def ping(self) -> None: ...

    def schema_revision(self) -> str | None: ...

    def head_position(self) -> int: ...

    def checkpoint(self, name: str) -> int | None:
        """The store-side checkpoint `name` (the relay's), None if never written."""
        ...


class ReadModelProbe(Protocol):
    """The read models' database (CONTINUUM_READ_MODEL_URL, else the event store's)."""

    @property
    def where(self) -> str: ...

    def source(self) -> str | None:
        """What feeds the read models ("store", "kafka:TOPIC"), None if nothing has yet."""
        ...

    def checkpoints(self, prefix: str) -> dict[str, int]: ...


@dataclass(frozen=True)
class ClusterInfo:
    cluster_id: str | None
    brokers: int


class BrokerProbe(Protocol):
    @property
    def bootstrap(self) -> str: ...

    def cluster(self) -> ClusterInfo: ...

    def partitions(self, topics: Collection[str]) -> dict[str, int]:
        """Partition count of each of `topics` that exists (missing ones are left out)."""
        ...

    def end_offsets(self, topic: str) -> dict[int, int]:
        """The next offset to be written, per partition."""
        ...

    def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed offsets on `topic`, per partition (empty if none)."""
        ...


@dataclass(frozen=True)
class TopicSpec:
    """A topic the deployment needs, with the partition count to create it with."""

    name: str
    partitions: int
    replication: int
    used_by: str
    create_with: str


# -- configuration -----------------------------------------------------------------------------

_FIELD_IN_SETTINGS_ERROR = re.compile(r'field "([a-z_]+)"')


def variable_for(field_name: str) -> str:
    return f"{ENV_PREFIX}{field_name.upper()}"


def check_config(
    load: Callable[[], Settings], environ: Mapping[str, str]
) -> tuple[CheckResult, Settings | None]:
    """Settings load from the environment; a bad value names its variable. Unknown CONTINUUM_*
    variables (typos: Settings ignores them silently) are a WARN with the likely intent."""
    try:
        settings = load()
    except ValidationError as exc:
        problems = []
        for issue in exc.errors():
            names = [str(p) for p in issue["loc"] if isinstance(p, str)]
            where = variable_for(names[0]) if names else "the settings"
            problems.append(f"{where}: {issue['msg']}")
        return (
            CheckResult(
                "config",
                Status.FAIL,
                "invalid settings: " + "; ".join(problems),
                fix="correct the variable(s) named above (docs/deploy.md lists every setting)",
                details={"errors": problems},
            ),
            None,
        )
    except Exception as exc:  # pydantic-settings' SettingsError: a value it cannot parse
        match = _FIELD_IN_SETTINGS_ERROR.search(str(exc))
        where = variable_for(match.group(1)) if match else "a CONTINUUM_* variable"
        return (
            CheckResult(
                "config",
                Status.FAIL,
                f"invalid settings: {where} cannot be parsed ({type(exc).__name__}: {exc})",
                fix=f'correct {where} (list settings are JSON, e.g. ["/etc/continuum/policies"])',
            ),
            None,
        )
    known = {variable_for(name) for name in Settings.model_fields} | OTHER_VARIABLES
    unknown = sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    )
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        return (
            CheckResult(
                "config",
                Status.WARN,
                "settings load, but these variables are not settings and are ignored: "
                + ", ".join(hints),
                fix="rename or remove them (docs/deploy.md lists every setting)",
                details={"unknown": unknown},
            ),
            settings,
        )
    if settings.auth_mode == "dev":
        return (
            CheckResult(
                "config",
                Status.WARN,
                "settings load; CONTINUUM_AUTH_MODE=dev: the API accepts tokens from the local "
                "development issuer",
                fix="in production set CONTINUUM_AUTH_MODE=oidc and CONTINUUM_AUTH_ISSUER",
            ),
            settings,
        )
    return CheckResult("config", Status.OK, "settings load"), settings


# -- database ----------------------------------------------------------------------------------


def _error(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    text = lines[0] if lines else ""
    kind = type(exc).__name__
    return (text if text.startswith(kind) else f"{kind}: {text}")[:300]


def check_database(db: DatabaseProbe) -> CheckResult:
    try:
        db.ping()
    except Exception as exc:
        return CheckResult(
            "database",
            Status.FAIL,
            f"cannot reach the database at {db.where} ({_error(exc)})",
            fix="check CONTINUUM_DATABASE_URL (host, port, user, password, database) and that "
            "the server is running and accepts connections from here",
        )
    return CheckResult("database", Status.OK, f"{db.where} answers")


def check_schema(db: DatabaseProbe, head: str, known: Collection[str]) -> CheckResult:
    try:
        current = db.schema_revision()
    except Exception as exc:
        return CheckResult(
            "schema",
            Status.FAIL,
            f"cannot read the schema revision of {db.where} ({_error(exc)})",
            fix="check that CONTINUUM_DATABASE_URL's user may read the database",
        )
    details = {"current": current, "head": head}
    if current == head:
        return CheckResult("schema", Status.OK, f"schema at head revision {head}", details=details)
    if current is not None and current not in known:
        return CheckResult(
            "schema",
            Status.FAIL,
            f"schema revision {current} is unknown to this release (its newest is {head}): "
            "a newer release migrated this database",
            fix="run the release that migrated it (or newer); never downgrade by hand",
            details=details,
        )
    found = f"at revision {current}" if current else "empty (no schema)"
    if db.auto_migrates:
        return CheckResult(
            "schema",
            Status.WARN,
            f"the SQLite database is {found}, head is {head}: it migrates itself on first use",
            fix="nothing needed; `continuum db upgrade` does it now",
            details=details,
        )
    return CheckResult(
        "schema",
        Status.FAIL,
        f"the database is {found}, expected head revision {head}: every command refuses it",
        fix="run `continuum db upgrade` (in compose: the `migrate` service)",
        details=details,
    )


def _lag_result(
    name: str, lag: int, max_lag: int, what: str, behind_fix: str, details: dict[str, Any]
) -> CheckResult:
    details = {**details, "lag": lag, "max_lag": max_lag}
    if lag == 0:
        return CheckResult(name, Status.OK, f"{what} is up to date", details=details)
    status = Status.WARN if lag <= max_lag else Status.FAIL
    limit = f" (limit {max_lag})" if status is Status.FAIL else ""
    return CheckResult(
        name, status, f"{what} is {lag} behind{limit}", fix=behind_fix, details=details
    )


def check_relay(db: DatabaseProbe, topic: str, max_lag: int) -> CheckResult:
    """The relay's lag: the store's head position minus its checkpoint for `topic`."""
    name = RELAY_CHECKPOINT.format(topic=topic)
    try:
        head = db.head_position()
        checkpoint = db.checkpoint(name)
    except Exception as exc:
        return CheckResult(
            "relay", Status.FAIL, f"cannot read the store head or {name} ({_error(exc)})"
        )
    details: dict[str, Any] = {"topic": topic, "head": head, "checkpoint": checkpoint}
    if checkpoint is None:
        if head == 0:
            return CheckResult(
                "relay", Status.OK, "the log is empty; nothing to relay", details=details
            )
        return CheckResult(
            "relay",
            Status.FAIL if head > max_lag else Status.WARN,
            f"the relay has never published to {topic}; {head} events wait",
            fix=f"start `continuum relay` (it publishes to {topic} from the first event)",
            details={**details, "lag": head, "max_lag": max_lag},
        )
    if checkpoint > head:
        return CheckResult(
            "relay",
            Status.FAIL,
            f"the relay checkpoint {checkpoint} is past the store head {head}: this database's "
            "checkpoints belong to another log",
            fix="restore the event store that matches the checkpoints (the relay would skip "
            "new events)",
            details=details,
        )
    return _lag_result(
        "relay",
        head - checkpoint,
        max_lag,
        f"the relay to {topic} (checkpoint {checkpoint}, head {head})",
        "is `continuum relay` running and reaching the broker? It catches up by itself",
        details,
    )


# -- broker ------------------------------------------------------------------------------------


def check_broker(broker: BrokerProbe) -> CheckResult:
    try:
        info = broker.cluster()
    except Exception as exc:
        return CheckResult(
            "broker",
            Status.FAIL,
            f"cannot reach Kafka at {broker.bootstrap} ({_error(exc)})",
            fix="check CONTINUUM_KAFKA_BOOTSTRAP_SERVERS and that the broker is running and "
            "advertises an address this host can reach (advertised.listeners)",
        )
    return CheckResult(
        "broker",
        Status.OK,
        f"Kafka at {broker.bootstrap} answers (cluster {info.cluster_id}, {info.brokers} "
        f"broker{'s' if info.brokers != 1 else ''})",
        details={"cluster_id": info.cluster_id, "brokers": info.brokers},
    )


def create_topic_command(spec: TopicSpec, bootstrap: str) -> str:
    return (
        f"`{spec.create_with}`, or `kafka-topics.sh --bootstrap-server {bootstrap} --create "
        f"--topic {spec.name} --partitions {spec.partitions} --replication-factor "
        f"{spec.replication}`"
    )


def check_topics(broker: BrokerProbe, specs: list[TopicSpec]) -> list[CheckResult]:
    """One result per topic: missing is a FAIL (its user refuses to start), fewer partitions
    than expected a WARN (it caps how many consumers share the work)."""
    try:
        found = broker.partitions([s.name for s in specs])
    except Exception as exc:
        return [
            CheckResult(
                f"topic {s.name}",
                Status.FAIL,
                f"cannot describe topic {s.name} ({_error(exc)})",
                fix="grant this client DESCRIBE on the topics",
            )
            for s in specs
        ]
    results = []
    for spec in specs:
        name = f"topic {spec.name}"
        count = found.get(spec.name)
        details: dict[str, Any] = {"partitions": count, "expected": spec.partitions}
        if count is None:
            results.append(
                CheckResult(
                    name,
                    Status.FAIL,
                    f"topic {spec.name} ({spec.used_by}) does not exist",
                    fix=f"create topic {spec.name} with {spec.partitions} partitions: "
                    + create_topic_command(spec, broker.bootstrap),
                    details=details,
                )
            )
        elif count < spec.partitions:
            results.append(
                CheckResult(
                    name,
                    Status.WARN,
                    f"topic {spec.name} has {count} partitions, expected {spec.partitions}: at "
                    f"most {count} consumers share its work",
                    fix="adding partitions moves patients to other partitions: do it only with "
                    "the relay stopped and every consumer drained (`kafka-topics.sh --alter "
                    f"--topic {spec.name} --partitions {spec.partitions}`)",
                    details=details,
                )
            )
        else:
            results.append(
                CheckResult(
                    name, Status.OK, f"topic {spec.name}: {count} partitions", details=details
                )
            )
    return results


def check_group_lag(
    broker: BrokerProbe,
    group: str,
    topic: str,
    max_lag: int,
    start_with: str,
    *,
    expected: bool = True,
) -> CheckResult:
    """A consumer group's lag on `topic`: end offsets minus committed offsets. A group that
    has committed nothing is a problem only if this deployment is `expected` to run it."""
    name = f"group {group}"
    try:
        ends = broker.end_offsets(topic)
        committed = broker.committed(group, topic)
    except Exception as exc:
        return CheckResult(
            name,
            Status.FAIL,
            f"cannot read offsets of group {group} on {topic} ({_error(exc)})",
            fix=f"check that topic {topic} exists and that this client may DESCRIBE the group",
        )
    total = sum(ends.values())
    details: dict[str, Any] = {"topic": topic, "end_offsets": ends, "committed": committed}
    if not committed:
        if not expected:
            return CheckResult(
                name,
                Status.SKIP,
                f"group {group} has committed nothing on {topic}: not in use here",
                details=details,
            )
        if total == 0:
            return CheckResult(
                name, Status.OK, f"{topic} is empty; nothing to consume", details=details
            )
        return CheckResult(
            name,
            Status.FAIL if total > max_lag else Status.WARN,
            f"group {group} has committed no offsets on {topic} ({total} messages wait)",
            fix=f"start {start_with}",
            details={**details, "lag": total, "max_lag": max_lag},
        )
    lag = sum(max(0, end - committed.get(p, 0)) for p, end in ends.items())
    return _lag_result(
        name,
        lag,
        max_lag,
        f"group {group} on {topic}",
        f"is {start_with} running? Add workers (up to one per partition) if the lag keeps growing",
        details,
    )


# -- projections -------------------------------------------------------------------------------


def check_projections(
    model: ReadModelProbe,
    db: DatabaseProbe,
    broker: BrokerProbe | None,
    max_lag: int,
) -> CheckResult:
    """The read models' checkpoint lag, against the store or the events topic, whichever
    feeds them."""
    name = "projections"
    try:
        source = model.source()
    except Exception as exc:
        return CheckResult(
            name,
            Status.FAIL,
            f"cannot read the read models at {model.where} ({_error(exc)})",
            fix="check CONTINUUM_READ_MODEL_URL (default: the event store's database)",
        )
    start = (
        "`continuum project --follow` (or `continuum serve`, which projects in-process), or "
        "`continuum project --source kafka --follow` for a Kafka-fed read model"
    )
    if source is None:
        return CheckResult(
            name,
            Status.WARN,
            f"nothing has projected into {model.where} yet",
            fix=f"start {start}",
        )
    if " as of " in source:
        return CheckResult(
            name,
            Status.WARN,
            f"the read models at {model.where} are a point-in-time replay ({source})",
            fix="point CONTINUUM_READ_MODEL_URL at the live read models",
            details={"source": source},
        )
    details: dict[str, Any] = {"source": source}
    try:
        if source == STORE_SOURCE:
            head = db.head_position()
            checkpoint = model.checkpoints(STORE_SOURCE).get(STORE_SOURCE, 0)
            lag = max(0, head - checkpoint)
            details.update(head=head, checkpoint=checkpoint)
            fix = "is `continuum project --follow` (or `continuum serve --project`) running?"
        elif source.startswith(KAFKA_SOURCE_PREFIX):
            topic = source.removeprefix(KAFKA_SOURCE_PREFIX)
            if broker is None:
                return CheckResult(
                    name,
                    Status.SKIP,
                    f"the read models are fed by {source}; the broker is not checked",
                    details=details,
                )
            ends = broker.end_offsets(topic)
            saved = model.checkpoints(f"{source}:")
            lag = sum(max(0, end - saved.get(f"{source}:{p}", 0)) for p, end in ends.items())
            details.update(end_offsets=ends, checkpoints=saved)
            fix = "is `continuum project --source kafka --follow` running?"
        else:
            return CheckResult(
                name,
                Status.WARN,
                f"the read models are fed by {source}, which this release does not know",
                details=details,
            )
    except Exception as exc:
        return CheckResult(
            name, Status.FAIL, f"cannot compute the projection lag ({_error(exc)})", details=details
        )
    return _lag_result(name, lag, max_lag, f"the read models ({source})", fix, details)


# -- the whole diagnosis -----------------------------------------------------------------------


class CheckName(StrEnum):
    CONFIG = "config"
    DATABASE = "database"
    SCHEMA = "schema"
    RELAY = "relay"
    PROJECTIONS = "projections"
    BROKER = "broker"
    TOPICS = "topics"
    CONSUMERS = "consumers"


@dataclass(frozen=True)
class Options:
    #: Run only these checks (configuration always runs); empty: all of them.
    only: frozenset[CheckName] = frozenset()
    #: Check the broker, topics and groups: None means "when CONTINUUM_KAFKA_BOOTSTRAP_SERVERS
    #: is set" (its default points at a local broker that a SQLite-only setup does not run).
    kafka: bool | None = None
    #: Check the ADT feed's topics and the ingest group.
    ingest: bool = True
    partitions: int = 6
    replication: int = 1
    max_lag: int | None = None
    projection_group: str = "continuum-projections"

    def wants(self, name: CheckName) -> bool:
        return not self.only or name in self.only


@dataclass
class Ports:
    """How to reach each part, made once the settings are known."""

    database: Callable[[Settings], DatabaseProbe]
    read_model: Callable[[Settings], ReadModelProbe]
    broker: Callable[[Settings], BrokerProbe]
    #: The newest schema revision this release knows, and every revision it knows.
    head_revision: str
    known_revisions: frozenset[str]


def _skip(name: str, why: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, why)


def topic_specs(settings: Settings, options: Options) -> list[TopicSpec]:
    n, r = options.partitions, options.replication
    specs = [
        TopicSpec(
            settings.events_topic,
            n,
            r,
            "the relay writes it; Kafka projection workers read it",
            f"continuum relay --create-topic --partitions {n} --replication-factor {r}",
        )
    ]
    if options.ingest:
        ingest = f"continuum ingest --create-topic --partitions {n} --replication-factor {r}"
        specs += [
            TopicSpec(
                settings.adt_topic, n, r, "the hospital ADT feed `continuum ingest` reads", ingest
            ),
            TopicSpec(settings.adt_topic + ".dlq", n, r, "the ADT feed's dead letters", ingest),
        ]
    return specs


def diagnose(
    load: Callable[[], Settings], environ: Mapping[str, str], ports: Ports, options: Options
) -> Report:
    """Run the checks in order; a check whose prerequisite failed is skipped, saying which."""
    config, settings = check_config(load, environ)
    if settings is None:
        others = [n for n in CheckName if n is not CheckName.CONFIG]
        return Report([config] + [_skip(n.value, "configuration invalid") for n in others])
    run = _Diagnosis(settings, ports, options)
    run.results.append(config)
    run.database()
    run.broker()
    run.topics()
    run.projections()
    run.consumers()
    return Report(run.results)


_KAFKA_CHECKS = (CheckName.BROKER, CheckName.TOPICS, CheckName.CONSUMERS)


class _Diagnosis:
    """The state one diagnosis carries from check to check (what failed, what feeds what)."""

    def __init__(self, settings: Settings, ports: Ports, options: Options) -> None:
        self.settings = settings
        self.ports = ports
        self.options = options
        self.max_lag = (
            settings.api_max_projection_lag if options.max_lag is None else options.max_lag
        )
        self.kafka = (
            "kafka_bootstrap_servers" in settings.model_fields_set
            if options.kafka is None
            else options.kafka
        )
        self.results: list[CheckResult] = []
        self.db = ports.database(settings)
        self.db_down = False
        self.broker_probe: BrokerProbe | None = None
        self.broker_down = False
        self.missing_topics: set[str] = set()
        self.source: str | None = None

    def _add(self, result: CheckResult) -> CheckResult:
        self.results.append(result)
        return result

    def database(self) -> None:
        wants = self.options.wants
        if wants(CheckName.DATABASE):
            self.db_down = self._add(check_database(self.db)).status is Status.FAIL
        schema_bad = False
        if wants(CheckName.SCHEMA):
            if self.db_down:
                self._add(_skip("schema", "database unreachable"))
            else:
                schema = check_schema(self.db, self.ports.head_revision, self.ports.known_revisions)
                schema_bad = self._add(schema).status is not Status.OK
        if not wants(CheckName.RELAY):
            return
        if not self.kafka:
            self._add(_skip("relay", "Kafka not configured (CONTINUUM_KAFKA_BOOTSTRAP_SERVERS)"))
        elif self.db_down or schema_bad:
            self._add(_skip("relay", "database unreachable or schema not at head"))
        else:
            self._add(check_relay(self.db, self.settings.events_topic, self.max_lag))

    def broker(self) -> None:
        wants = self.options.wants
        if not self.kafka:
            why = "Kafka not configured: set CONTINUUM_KAFKA_BOOTSTRAP_SERVERS to check it"
            self.results += [_skip(n.value, why) for n in _KAFKA_CHECKS if wants(n)]
            return
        if not any(wants(n) for n in (*_KAFKA_CHECKS, CheckName.PROJECTIONS)):
            return
        self.broker_probe = self.ports.broker(self.settings)
        cluster = check_broker(self.broker_probe)
        self.broker_down = cluster.status is Status.FAIL
        if wants(CheckName.BROKER) or self.broker_down:
            self._add(cluster)

    def topics(self) -> None:
        if self.broker_probe is None or not self.options.wants(CheckName.TOPICS):
            return
        specs = topic_specs(self.settings, self.options)
        if self.broker_down:
            self.results += [_skip(f"topic {s.name}", "broker unreachable") for s in specs]
            return
        found = check_topics(self.broker_probe, specs)
        self.results += found
        self.missing_topics = {
            s.name for s, r in zip(specs, found, strict=True) if r.status is Status.FAIL
        }

    def projections(self) -> None:
        if not self.options.wants(CheckName.PROJECTIONS):
            return
        if self.db_down:
            self._add(_skip("projections", "database unreachable"))
            return
        model = self.ports.read_model(self.settings)
        broker = None if self.broker_down else self.broker_probe
        result = self._add(check_projections(model, self.db, broker, self.max_lag))
        source = result.details.get("source")
        self.source = source if isinstance(source, str) else None

    def consumers(self) -> None:
        if self.broker_probe is None or not self.options.wants(CheckName.CONSUMERS):
            return
        kafka_fed = bool(self.source and self.source.startswith(KAFKA_SOURCE_PREFIX))
        groups = [
            (
                self.options.projection_group,
                self.settings.events_topic,
                "`continuum project --source kafka --follow`",
                kafka_fed,
            )
        ]
        if self.options.ingest:
            groups.append(
                (self.settings.ingest_group, self.settings.adt_topic, "`continuum ingest`", True)
            )
        for group, topic, start_with, expected in groups:
            if self.broker_down:
                self._add(_skip(f"group {group}", "broker unreachable"))
            elif topic in self.missing_topics:
                self._add(_skip(f"group {group}", f"topic {topic} missing"))
            else:
                self._add(
                    check_group_lag(
                        self.broker_probe, group, topic, self.max_lag, start_with, expected=expected
                    )
                )
