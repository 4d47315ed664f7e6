"""The `continuum` command line. Each command builds a domain command and hands it to the
service; nothing here decides anything.

Exit codes: 0 ok, 1 unexpected failure, 2 usage error, 3 invalid input, 4 not found,
5 refused by a rule, 6 version conflict, 7 duplicate, 8 configuration or schema not ready,
9 database unreachable.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import OperationalError

from continuum.adapters.kafka.errors import BrokerUnavailable, TopicProblem
from continuum.application.ports import AppendResult
from continuum.application.service import CommandContext
from continuum.bootstrap import App, bootstrap
from continuum.domain import commands as c
from continuum.domain import errors as e
from continuum.entrypoints.consent_cli import register as register_consent
from continuum.entrypoints.doctor_cli import doctor
from continuum.entrypoints.ingest_cli import ingest
from continuum.entrypoints.projections_cli import (
    audit_app,
    census,
    metrics,
    project,
    projection_check,
    replay,
)
from continuum.entrypoints.serve_cli import serve
from continuum.entrypoints.token_cli import token_app
from continuum.entrypoints.verify_cli import EXTRA_CHECKS, seal, verify
from continuum.settings import Settings
from continuum_events import Actor

app = typer.Typer(
    name="continuum",
    help="Track patients through the substance-use-disorder continuum of care.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
log_app = typer.Typer(help="The event log.", no_args_is_help=True)
schemas_app = typer.Typer(help="JSON Schemas of the event contract.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(log_app, name="log")
app.add_typer(schemas_app, name="schemas")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_CODES: list[tuple[type[Exception], int]] = [
    (BrokerUnavailable, 9),
    (TopicProblem, 8),
    (e.ConcurrencyConflict, 6),
    (e.Duplicate, 7),
    (e.NotFound, 4),
    (e.CommandRefused, 5),
    (e.InvalidInput, 3),
    (e.PolicyInvalid, 8),
    (e.StoreNotReady, 8),
]


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


T = TypeVar("T")


def _fail(code: int, message: str, payload: dict[str, Any] | None = None) -> NoReturn:
    # The message is plain text (it may end in "[rule …]"): escape it, or rich eats it as markup.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    if payload:
        err.print(json.dumps(payload, sort_keys=True), markup=False)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn every expected failure into one clear line and a specific exit code."""
    try:
        yield
    except e.ContinuumError as exc:
        code = next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), 1)
        _fail(code, str(exc), exc.as_dict())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc']) or 'input'}: {issue['msg']}"
            for issue in exc.errors()
        )
        _fail(3, f"invalid input: {problems}")
    except OperationalError as exc:
        _fail(
            9,
            f"cannot use the database: {exc.orig}. Check CONTINUUM_DATABASE_URL and that the "
            "server is running.",
        )


def _settings() -> Settings:
    with _errors():
        return Settings()
    raise AssertionError  # pragma: no cover


@contextmanager
def _app() -> Iterator[App]:
    with _errors():
        application = bootstrap(_settings())
        try:
            yield application
        finally:
            application.close()


def record_access(
    application: App,
    action: str,
    resource: str,
    *,
    patient_key: str | None = None,
    records: int | None = None,
) -> None:
    """Record a CLI read of patient-level data in the access log (as the HTTP API does):
    the operator is CONTINUUM_ACTOR_ID with CONTINUUM_ACTOR_ROLE."""
    import datetime as dt

    from continuum.adapters.sql.access_log import SqlAccessLog
    from continuum.application.access import DEFAULT_PURPOSE, PurposeOfUse, Role
    from continuum.application.ports import AccessEntry

    settings = application.settings
    role = settings.actor_role
    purpose = (
        DEFAULT_PURPOSE.get(Role(role), PurposeOfUse.HOPERAT)
        if role in set(Role)
        else (PurposeOfUse.HOPERAT)
    )
    SqlAccessLog(application.engine).record(
        AccessEntry(
            at=dt.datetime.now(dt.UTC),
            subject=settings.actor_id,
            role=role,
            channel="cli",
            action=action,
            resource=resource[:256],
            purpose=purpose.value,
            outcome="allowed",
            patient_key=patient_key,
            records=records,
        )
    )


def _context(application: App, actor: str | None, idempotency_key: str | None) -> CommandContext:
    settings = application.settings
    return CommandContext(
        actor=Actor.model_validate({"id": actor or settings.actor_id, "role": settings.actor_role}),
        idempotency_key=idempotency_key,
    )


def parse_ratings(text: str) -> dict[str, str]:
    """'0,1,2,0,3,1' (dimensions 1..6 in order) or '1=0,2=1,...'."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all("=" in p for p in parts):
        return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in parts)}
    if any("=" in p for p in parts):
        raise e.InvalidInput(
            "ratings mix 'D=R' and plain forms; use one form", field="ratings", value=text
        )
    return {str(i): value for i, value in enumerate(parts, start=1)}


def parse_scores(values: list[str]) -> dict[str, float]:
    scores = {}
    for item in values:
        name, sep, number = item.partition("=")
        try:
            if not sep:
                raise ValueError
            scores[name.strip()] = float(number)
        except ValueError:
            raise e.InvalidInput(
                f"score {item!r} is not NAME=NUMBER (e.g. ciwa-ar=12)", field="score"
            ) from None
    return scores


def _report(
    result: AppendResult, fmt: OutputFormat, summary: Callable[[AppendResult], str]
) -> None:
    if fmt is OutputFormat.JSON:
        out.print_json(
            json.dumps(
                {
                    "patient_key": result.stream_id,
                    "stream_version": result.stream_version,
                    "replayed": result.replayed,
                    "events": [ev.to_json_dict() for ev in result.events],
                }
            )
        )
        return
    note = " (idempotent retry: nothing new recorded)" if result.replayed else ""
    out.print(f"{summary(result)}{note}")
    for event in result.events:
        out.print(f"  event {event.event_id} {event.event_type} v{event.stream_version}")


def _handle(
    build: Callable[[], c.Command],
    actor: str | None,
    idempotency_key: str | None,
    fmt: OutputFormat,
    summary: Callable[[AppendResult], str],
) -> None:
    with _app() as application:
        with _errors():
            command = build()
            result = application.service.handle(
                command, _context(application, actor, idempotency_key)
            )
        _report(result, fmt, summary)


def _assessment(
    ratings: str,
    instrument: str,
    assessor: str,
    hours: float | None,
    score: list[str],
    source_ref: str | None,
) -> dict[str, Any]:
    return {
        "instrument": instrument,
        "assessor_id": assessor,
        "ratings": parse_ratings(ratings),
        "hours_scheduled": hours,
        "scores": parse_scores(score),
        "source_ref": source_ref,
    }


# -- shared options -------------------------------------------------------------------------

Patient = Annotated[str, typer.Argument(help="Pseudonymous patient key (pk-...).")]
OccurredAt = Annotated[
    str | None,
    typer.Option(help="Clinical time, ISO 8601 with offset (default: now)."),
]
Ratings = Annotated[
    str, typer.Option(help="Six dimension ratings: '0,1,2,0,3,1' or '1=0,2=1,...'.")
]
Instrument = Annotated[str, typer.Option(help="Assessment instrument code.")]
Assessor = Annotated[str, typer.Option(help="Assessor id.")]
Hours = Annotated[float | None, typer.Option(help="Hours of service per week scheduled.")]
Scores = Annotated[list[str], typer.Option("--score", help="Instrument score NAME=NUMBER.")]
SourceRef = Annotated[str | None, typer.Option(help="Id of the narrative in the source record.")]
Variance = Annotated[
    str | None,
    typer.Option(
        help="Why the level differs from the indicated one: patient_preference, no_slot, "
        "payer_decision, clinical_override."
    ),
]
AuthRef = Annotated[str | None, typer.Option(help="Payer authorization reference.")]
ActorOpt = Annotated[str | None, typer.Option(help="Actor id (default CONTINUUM_ACTOR_ID).")]
IdemKey = Annotated[
    str | None, typer.Option(help="Idempotency key: a retry with it records nothing new.")
]
Expected = Annotated[
    int | None, typer.Option(help="Refuse unless the patient is at this stream version.")
]
Format = Annotated[OutputFormat, typer.Option("--format", help="Output format.")]


# -- commands -------------------------------------------------------------------------------


@app.command()
def admit(
    level: Annotated[str, typer.Option(help="Level of care provided, e.g. 3.5.")],
    site: Annotated[str, typer.Option(help="Site code.")],
    ratings: Ratings,
    age_group: Annotated[str, typer.Option(help="adult or adolescent.")] = "adult",
    program: Annotated[str | None, typer.Option(help="Program code.")] = None,
    instrument: Instrument = "asam-ca",
    assessor: Assessor = "unknown",
    hours: Hours = None,
    score: Scores = [],  # noqa: B006 - typer needs a literal default
    source_ref: SourceRef = None,
    variance_reason: Variance = None,
    authorization_ref: AuthRef = None,
    occurred_at: OccurredAt = None,
    patient_key: Annotated[str | None, typer.Option(help="Use this key (default: new).")] = None,
    given_name: Annotated[str | None, typer.Option(help="Identity (kept out of events).")] = None,
    family_name: Annotated[str | None, typer.Option(help="Identity.")] = None,
    birth_date: Annotated[str | None, typer.Option(help="Identity, YYYY-MM-DD.")] = None,
    mrn: Annotated[str | None, typer.Option(help="Identity: medical record number.")] = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """Admit a patient: initial assessment, level, site."""

    def build() -> c.Command:
        identity = None
        if any(v is not None for v in (given_name, family_name, birth_date, mrn)):
            identity = {
                "given_name": given_name,
                "family_name": family_name,
                "birth_date": birth_date,
                "mrn": mrn,
            }
        return c.Admit.model_validate(
            {
                "patient_key": patient_key,
                "occurred_at": occurred_at,
                "level": level,
                "site": site,
                "program": program,
                "age_group": age_group,
                "assessment": _assessment(ratings, instrument, assessor, hours, score, source_ref),
                "variance_reason": variance_reason,
                "authorization_ref": authorization_ref,
                "identity": identity,
            }
        )

    _handle(
        build,
        actor,
        idempotency_key,
        fmt,
        lambda r: f"admitted {r.stream_id} to {_level_of(r)} (episode {_episode_of(r)})",
    )


@app.command()
def readmit(
    patient: Patient,
    level: Annotated[str, typer.Option(help="Level of care provided.")],
    site: Annotated[str, typer.Option(help="Site code.")],
    ratings: Ratings,
    age_group: Annotated[str | None, typer.Option(help="adult or adolescent.")] = None,
    program: Annotated[str | None, typer.Option(help="Program code.")] = None,
    instrument: Instrument = "asam-ca",
    assessor: Assessor = "unknown",
    hours: Hours = None,
    score: Scores = [],  # noqa: B006
    source_ref: SourceRef = None,
    variance_reason: Variance = None,
    authorization_ref: AuthRef = None,
    occurred_at: OccurredAt = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    expected_version: Expected = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """Start a new episode for a discharged patient."""
    _handle(
        lambda: c.Readmit.model_validate(
            {
                "patient_key": patient,
                "occurred_at": occurred_at,
                "level": level,
                "site": site,
                "program": program,
                "age_group": age_group,
                "assessment": _assessment(ratings, instrument, assessor, hours, score, source_ref),
                "variance_reason": variance_reason,
                "authorization_ref": authorization_ref,
                "expected_version": expected_version,
            }
        ),
        actor,
        idempotency_key,
        fmt,
        lambda r: f"readmitted {r.stream_id} to {_level_of(r)} (episode {_episode_of(r)})",
    )


@app.command()
def reassess(
    patient: Patient,
    ratings: Ratings,
    instrument: Instrument = "asam-ca",
    assessor: Assessor = "unknown",
    hours: Hours = None,
    score: Scores = [],  # noqa: B006
    source_ref: SourceRef = None,
    occurred_at: OccurredAt = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    expected_version: Expected = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """Record a dated reassessment (the evidence a transition rests on)."""
    _handle(
        lambda: c.RecordReassessment.model_validate(
            {
                "patient_key": patient,
                "occurred_at": occurred_at,
                "assessment": _assessment(ratings, instrument, assessor, hours, score, source_ref),
                "expected_version": expected_version,
            }
        ),
        actor,
        idempotency_key,
        fmt,
        lambda r: f"reassessed {r.stream_id}: indicated level {_indicated_of(r)}",
    )


@app.command()
def transition(
    patient: Patient,
    to: Annotated[str, typer.Option("--to", help="Level to move to.")],
    site: Annotated[str | None, typer.Option(help="Site (default: current).")] = None,
    program: Annotated[str | None, typer.Option(help="Program (default: current).")] = None,
    reassessment: Annotated[
        str | None, typer.Option(help="Event id of the reassessment (default: the latest).")
    ] = None,
    variance_reason: Variance = None,
    authorization_ref: AuthRef = None,
    occurred_at: OccurredAt = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    expected_version: Expected = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """Move a patient to another level or site; needs a fresh reassessment."""

    def summary(r: AppendResult) -> str:
        data: Any = r.events[0].data
        return (
            f"{data.direction.value.replace('_', '-')} {r.stream_id}: "
            f"{data.from_level} -> {data.placement.level}"
        )

    _handle(
        lambda: c.Transition.model_validate(
            {
                "patient_key": patient,
                "occurred_at": occurred_at,
                "to_level": to,
                "site": site,
                "program": program,
                "reassessment_event_id": reassessment,
                "variance_reason": variance_reason,
                "authorization_ref": authorization_ref,
                "expected_version": expected_version,
            }
        ),
        actor,
        idempotency_key,
        fmt,
        summary,
    )


@app.command()
def attend(
    patient: Patient,
    hours: Annotated[float, typer.Option(help="Hours attended.")],
    date: Annotated[
        str | None, typer.Option(help="Service date YYYY-MM-DD (default today).")
    ] = None,
    occurred_at: OccurredAt = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    expected_version: Expected = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """Record hours of service attended on a date."""
    _handle(
        lambda: c.RecordAttendance.model_validate(
            {
                "patient_key": patient,
                "service_date": date or dt.datetime.now(dt.UTC).date().isoformat(),
                "hours": hours,
                "occurred_at": occurred_at,
                "expected_version": expected_version,
            }
        ),
        actor,
        idempotency_key,
        fmt,
        lambda r: f"attendance recorded for {r.stream_id}",
    )


@app.command()
def discharge(
    patient: Patient,
    reason: Annotated[
        str,
        typer.Option(
            help="TEDS reason: completed, transferred, dropped_out, terminated, incarcerated, "
            "death, other."
        ),
    ],
    disposition: Annotated[
        str, typer.Option(help="FHIR disposition: home, other-hcf, aadvice, exp, psy, rehab, ...")
    ],
    occurred_at: OccurredAt = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    expected_version: Expected = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """End the patient's episode."""
    _handle(
        lambda: c.Discharge.model_validate(
            {
                "patient_key": patient,
                "occurred_at": occurred_at,
                "reason": reason,
                "disposition": disposition,
                "expected_version": expected_version,
            }
        ),
        actor,
        idempotency_key,
        fmt,
        lambda r: f"discharged {r.stream_id} ({reason})",
    )


@app.command()
def void(
    patient: Patient,
    event_id: Annotated[str, typer.Argument(help="Event id to void.")],
    reason: Annotated[
        str,
        typer.Option(
            help="entered_in_error, wrong_patient, wrong_date, duplicate, cancelled_by_source."
        ),
    ],
    occurred_at: OccurredAt = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    expected_version: Expected = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """Void a mistaken event: a later event marks it void; nothing is deleted."""
    _handle(
        lambda: c.VoidEvent.model_validate(
            {
                "patient_key": patient,
                "event_id": event_id,
                "reason": reason,
                "occurred_at": occurred_at,
                "expected_version": expected_version,
            }
        ),
        actor,
        idempotency_key,
        fmt,
        lambda r: f"voided {event_id} on {r.stream_id}",
    )


@app.command()
def history(patient: Patient, fmt: Format = OutputFormat.TEXT) -> None:
    """A patient's timeline: every event, with its evidence and voids."""
    from continuum_projections.timeline import render

    with _app() as application, _errors():
        application.store.sequence()
        events = application.service.history(patient)
        record_access(
            application,
            "patient.timeline",
            f"history {patient}",
            patient_key=patient,
            records=len(events),
        )
        if fmt is OutputFormat.JSON:
            out.print_json(json.dumps([ev.to_json_dict() for ev in events]))
            return
        state = application.service.load(patient)
        out.print(f"patient {patient}: {state.state}" + (f" at {state.site}" if state.site else ""))
        for line in render(events):
            out.print(line, markup=False)


@log_app.command("export")
def log_export(
    after: Annotated[int, typer.Option(help="Export events after this position.")] = 0,
    output: Annotated[
        Path | None, typer.Option(help="Write to this file (default stdout).")
    ] = None,
) -> None:
    """Every event in global order as JSON lines: the canonical wire form, byte for byte what
    the relay publishes (the auditors' export)."""
    with _app() as application, _errors():
        application.store.sequence()
        head = application.store.head_position()
        record_access(
            application,
            "log.export",
            f"log export --after {after} (through {head})",
            records=max(0, head - after),
        )
        target = output.open("wb") if output else sys.stdout.buffer
        count = 0
        try:
            for event in application.store.iter_wire(after, batch=5_000):
                if event.position > head:
                    break
                target.write(event.value + b"\n")
                count += 1
        finally:
            if output:
                target.close()
            else:
                target.flush()
        err.print(f"exported {count} events after position {after}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the event store schema to the newest revision."""
    from continuum.adapters.sql.database import create_database_engine
    from continuum.adapters.sql.migrate import upgrade

    settings = _settings()
    with _errors():
        engine = create_database_engine(settings.database_url)
        try:
            before, after = upgrade(engine)
        finally:
            engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    out.print(f"schema of {where}: {before or 'empty'} -> {after}")


@db_app.command("status")
def db_status() -> None:
    """Show the schema revision and the size of the log."""
    from continuum.adapters.sql.database import create_database_engine
    from continuum.adapters.sql.migrate import current_revision, head_revision

    settings = _settings()
    with _errors():
        engine = create_database_engine(settings.database_url)
        try:
            current = current_revision(engine)
        finally:
            engine.dispose()
    head = head_revision()
    state = "up to date" if current == head else "behind: run `continuum db upgrade`"
    out.print(f"{engine.url.render_as_string(hide_password=True)}: {current or 'empty'} ({state})")


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument(help="Target directory.")] = Path(
        "docs/events/schemas"
    ),
) -> None:
    """Write the JSON Schema of every event type."""
    from continuum_events.schema import export

    for path in export(directory):
        out.print(str(path))


@app.command()
def simulate(
    patients: Annotated[int, typer.Option(min=1, max=1_000_000, help="Cohort size.")] = 200,
    days: Annotated[int, typer.Option(min=7, max=3650, help="Days simulated.")] = 180,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same journeys).")] = 1,
) -> None:
    """Run a synthetic cohort through the same command path, then print its census."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from continuum.simulation.cohort import simulate_cohort

    with _app() as application, _errors():
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            "{task.fields[rate]}",
            TimeRemainingColumn(),
            console=err,
            transient=False,
        ) as progress:
            task = progress.add_task("commands", total=None, rate="")

            def tick(done: int, total: int, rate: float) -> None:
                progress.update(task, completed=done, total=total, rate=f"{rate:,.0f} cmd/s")

            report = simulate_cohort(
                application.service, patients=patients, days=days, seed=seed, progress=tick
            )
        for line in report.summary_lines():
            out.print(line, markup=False)
    census()


@app.command()
def relay(
    once: Annotated[
        bool, typer.Option("--once", help="Publish what is committed now, then exit.")
    ] = False,
    topic: Annotated[
        str | None, typer.Option(help="Topic (default CONTINUUM_EVENTS_TOPIC).")
    ] = None,
    create_topic: Annotated[
        bool, typer.Option("--create-topic", help="Create the topic if it is missing.")
    ] = False,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions for --create-topic.")] = 6,
    replication_factor: Annotated[int, typer.Option(min=1, help="For --create-topic.")] = 1,
) -> None:
    """Publish every committed event, in global order, to Kafka (the outbox relay).

    Resumes from its durable checkpoint; waits out broker outages; stops cleanly on SIGTERM or
    Ctrl-C after the batch in flight is acknowledged."""
    import logging
    import signal
    import threading

    from continuum.adapters.kafka.clients import ensure_topic
    from continuum.adapters.kafka.publisher import KafkaPublisher
    from continuum.adapters.sql.database import is_sqlite
    from continuum.adapters.sql.notify import PgNotifyWaiter
    from continuum.adapters.sql.store import SqlCheckpoints
    from continuum.application.relay import PollingWaiter, Relay, RelayStats, Waiter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("kafka", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with _app() as application, _errors():
        settings = application.settings
        target = topic or settings.events_topic
        count = ensure_topic(
            settings,
            target,
            create=create_topic,
            partitions=partitions,
            replication=replication_factor,
        )
        err.print(
            f"relaying to {target} ({count} partitions) at {settings.kafka_bootstrap_servers}"
        )
        publisher = KafkaPublisher(settings, target)
        waiter: Waiter = (
            PollingWaiter(settings.relay_poll_interval_ms / 1000)
            if is_sqlite(application.engine)
            else PgNotifyWaiter(application.engine)
        )
        runner = Relay(
            application.store,
            SqlCheckpoints(application.engine),
            publisher,
            name=f"relay:{target}",
            batch_size=settings.relay_batch_size,
            waiter=waiter,
        )
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        began, start_count = [dt.datetime.now(dt.UTC)], [0]

        def report(stats: RelayStats) -> None:
            now = dt.datetime.now(dt.UTC)
            rate = (stats.published - start_count[0]) / max((now - began[0]).total_seconds(), 1e-9)
            began[0], start_count[0] = now, stats.published
            err.print(
                f"published {stats.published} events; checkpoint {stats.checkpoint}; "
                f"lag {stats.lag}; {rate:,.0f} events/s"
            )

        try:
            if once:
                published = runner.drain(stop)
                stats = runner.stats
                stats.head = application.store.head_position()
                out.print(
                    f"published {published} events to {target}; checkpoint {stats.checkpoint}"
                )
            else:
                stats = runner.run(stop, on_progress=report)
                out.print(f"stopped: published {stats.published} events; lag {stats.lag}")
        finally:
            publisher.close()
            waiter.close()


app.command()(ingest)
app.command()(seal)
app.command()(verify)
EXTRA_CHECKS.append(projection_check)
app.command()(census)
app.command()(metrics)
app.command()(project)
app.command()(serve)
app.command()(replay)
app.add_typer(audit_app, name="audit")
app.add_typer(token_app, name="token")
register_consent(app)
app.command()(doctor)


def _level_of(result: AppendResult) -> str:
    data: Any = result.events[0].data
    return str(data.placement.level)


def _indicated_of(result: AppendResult) -> str:
    data: Any = result.events[0].data
    return str(data.assessment.indicated_level)


def _episode_of(result: AppendResult) -> str:
    data: Any = result.events[0].data
    return str(data.episode_number)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
