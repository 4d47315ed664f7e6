"""`continuum consent ...` and `continuum disclose`: patients' consents to disclose their
records, and the publisher that discloses to one organization under them (docs/consent.md).

    continuum consent give PATIENT --org ORG --consent-id ID --purpose treatment \\
        [--purpose payment] [--expires YYYY-MM-DD] --document-ref REF
    continuum consent revoke PATIENT --consent-id ID
    continuum consent list PATIENT
    continuum disclose --org ORG [--follow] [--create-topic]

Registered in `cli.py` (`register`); uses cli.py's error handling and wiring, imported when a
command runs (cli.py imports this module to register the commands).
"""

from __future__ import annotations

import datetime as dt
import json
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from threading import Event

    from continuum.application.disclosure import DisclosurePublisher, DisclosureStats
    from continuum.application.ports import AppendResult

consent_app = typer.Typer(
    help="Patients' consents to disclose their records to an organization (42 CFR Part 2).",
    no_args_is_help=True,
)


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


Patient = Annotated[str, typer.Argument(help="Pseudonymous patient key (pk-...).")]
ConsentId = Annotated[
    str, typer.Option("--consent-id", help="The consent's id (unique for the patient).")
]
OccurredAt = Annotated[
    str | None, typer.Option(help="When it was recorded, ISO 8601 with offset (default: now).")
]
ActorOpt = Annotated[str | None, typer.Option(help="Actor id (default CONTINUUM_ACTOR_ID).")]
IdemKey = Annotated[
    str | None, typer.Option(help="Idempotency key: a retry with it records nothing new.")
]
Expected = Annotated[
    int | None, typer.Option(help="Refuse unless the patient is at this stream version.")
]
Format = Annotated[OutputFormat, typer.Option("--format", help="Output format.")]


def register(app: typer.Typer) -> None:
    """Add `consent` and `disclose` to the `continuum` application."""
    app.add_typer(consent_app, name="consent")
    app.command()(disclose)


def _purposes(values: list[str]) -> list[str]:
    """Repeated --purpose options, each possibly comma-separated."""
    return [p.strip() for value in values for p in value.split(",") if p.strip()]


def _cli_format(fmt: OutputFormat) -> Any:
    from continuum.entrypoints import cli as base

    return base.OutputFormat(fmt.value)


@consent_app.command("give")
def give(
    patient: Patient,
    org: Annotated[str, typer.Option("--org", help="Recipient organization code, e.g. hie-north.")],
    consent_id: ConsentId,
    purpose: Annotated[
        list[str],
        typer.Option(
            "--purpose",
            help="treatment, payment or health_care_operations (repeat, or comma-separate).",
        ),
    ],
    document_ref: Annotated[
        str,
        typer.Option("--document-ref", help="Id of the signed consent form in the source record."),
    ],
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="Last day in force, YYYY-MM-DD (default: until revoked)."),
    ] = None,
    given_on: Annotated[
        str | None, typer.Option("--given-on", help="Date signed, YYYY-MM-DD (default today).")
    ] = None,
    occurred_at: OccurredAt = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    expected_version: Expected = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """Record a patient's consent to disclose their records to an organization."""
    from continuum.domain import commands as c
    from continuum.entrypoints import cli as base

    def summary(result: AppendResult) -> str:
        data: Any = result.events[0].data
        until = f" until {data.expires_on}" if data.expires_on else " until revoked"
        return (
            f"consent {data.consent_id} of {result.stream_id} to {data.recipient_org} for "
            f"{', '.join(p.value for p in data.purposes)}{until}"
        )

    base._handle(
        lambda: c.GiveConsent.model_validate(
            {
                "patient_key": patient,
                "consent_id": consent_id,
                "recipient_org": org,
                "purposes": _purposes(purpose),
                "given_on": given_on,
                "expires_on": expires,
                "document_ref": document_ref,
                "occurred_at": occurred_at,
                "expected_version": expected_version,
            }
        ),
        actor,
        idempotency_key,
        _cli_format(fmt),
        summary,
    )


@consent_app.command("revoke")
def revoke(
    patient: Patient,
    consent_id: ConsentId,
    revoked_on: Annotated[
        str | None,
        typer.Option("--revoked-on", help="Date revoked, YYYY-MM-DD (default today)."),
    ] = None,
    occurred_at: OccurredAt = None,
    actor: ActorOpt = None,
    idempotency_key: IdemKey = None,
    expected_version: Expected = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """Record that a patient revoked a consent: nothing recorded after it is disclosed under
    it; what was disclosed before stays disclosed."""
    from continuum.domain import commands as c
    from continuum.entrypoints import cli as base

    def summary(result: AppendResult) -> str:
        data: Any = result.events[0].data
        return (
            f"consent {data.consent_id} of {result.stream_id} to {data.recipient_org} revoked "
            f"on {data.revoked_on}"
        )

    base._handle(
        lambda: c.RevokeConsent.model_validate(
            {
                "patient_key": patient,
                "consent_id": consent_id,
                "revoked_on": revoked_on,
                "occurred_at": occurred_at,
                "expected_version": expected_version,
            }
        ),
        actor,
        idempotency_key,
        _cli_format(fmt),
        summary,
    )


@consent_app.command("list")
def list_consents(
    patient: Patient,
    on: Annotated[
        str | None, typer.Option("--on", help="Status as of this date, YYYY-MM-DD (default today).")
    ] = None,
    fmt: Format = OutputFormat.TEXT,
) -> None:
    """A patient's consents with their status (active, revoked, expired) and how many
    messages were disclosed under each."""
    from collections import Counter

    from continuum.adapters.sql.disclosures import SqlDisclosureRecord
    from continuum.domain.errors import InvalidInput, UnknownPatient
    from continuum.entrypoints import cli as base

    with base._app() as application, base._errors():
        try:
            as_of = dt.date.fromisoformat(on) if on else dt.datetime.now(dt.UTC).date()
        except ValueError:
            raise InvalidInput(f"--on {on!r} is not a date YYYY-MM-DD", field="on") from None
        state = application.service.load(patient)
        if not state.exists:
            raise UnknownPatient(
                f"no patient with key {patient}", field="patient_key", patient=patient
            )
        consents = list(state.consents.values())
        record = SqlDisclosureRecord(application.engine)
        counts: Counter[str] = Counter()
        after = 0
        while page := record.query(patient_key=patient, after_id=after, limit=5_000):
            counts.update(d.consent_id for d in page)
            after = page[-1].id or after
        base.record_access(
            application,
            "patient.consents",
            f"consent list {patient}",
            patient_key=patient,
            records=len(consents),
        )
        rows: list[dict[str, Any]] = [
            {
                "consent_id": k.consent_id,
                "recipient_org": k.recipient_org,
                "purposes": [p.value for p in k.purposes],
                "given_on": k.given_on.isoformat(),
                "expires_on": k.expires_on.isoformat() if k.expires_on else None,
                "document_ref": k.document_ref,
                "status": k.status(as_of),
                "revoked_on": k.revoked_on.isoformat() if k.revoked_on else None,
                "given_event_id": str(k.event_id),
                "disclosures": counts[k.consent_id],
            }
            for k in consents
        ]
        if fmt is OutputFormat.JSON:
            base.out.print_json(
                json.dumps({"patient_key": patient, "as_of": str(as_of), "consents": rows})
            )
            return
        base.out.print(f"patient {patient}: {len(rows)} consent(s) as of {as_of}", markup=False)
        for row in rows:
            until = f" until {row['expires_on']}" if row["expires_on"] else ""
            revoked = f" on {row['revoked_on']}" if row["revoked_on"] else ""
            base.out.print(
                f"  {row['consent_id']} to {row['recipient_org']} for "
                f"{','.join(row['purposes'])}: {row['status']}{revoked}; given {row['given_on']}"
                f"{until}; form {row['document_ref']}; {row['disclosures']} disclosed",
                markup=False,
            )


def disclose(
    org: Annotated[str, typer.Option("--org", help="Recipient organization code.")],
    follow: Annotated[
        bool,
        typer.Option("--follow", help="Keep disclosing new events until SIGTERM or Ctrl-C."),
    ] = False,
    topic: Annotated[
        str | None,
        typer.Option(help="Topic (default: CONTINUUM_DISCLOSURE_TOPIC_PATTERN for the org)."),
    ] = None,
    create_topic: Annotated[
        bool, typer.Option("--create-topic", help="Create the topic if it is missing.")
    ] = False,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions for --create-topic.")] = 3,
    replication_factor: Annotated[int, typer.Option(min=1, help="For --create-topic.")] = 1,
) -> None:
    """Disclose the events of every patient with a consent in force to ORG, to ORG's own
    topic, with the 42 CFR Part 2 notice; record each disclosure.

    Without --follow: disclose what is committed now, then exit. Resumes from its durable
    checkpoint; stops cleanly on SIGTERM or Ctrl-C after the batch in flight is recorded."""
    import logging
    import signal
    import threading

    from continuum.adapters.kafka.clients import ensure_topic
    from continuum.adapters.kafka.disclosure import KafkaDisclosureChannel
    from continuum.adapters.sql.database import is_sqlite
    from continuum.adapters.sql.disclosures import SqlDisclosureRecord
    from continuum.adapters.sql.notify import PgNotifyWaiter
    from continuum.application.disclosure import DisclosurePublisher, disclosure_topic
    from continuum.application.relay import PollingWaiter, Waiter
    from continuum.domain.patient import check_org_code
    from continuum.entrypoints import cli as base

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("kafka", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with base._app() as application, base._errors():
        settings = application.settings
        check_org_code(org)
        target = topic or disclosure_topic(org, settings.disclosure_topic_pattern)
        count = ensure_topic(
            settings,
            target,
            create=create_topic,
            partitions=partitions,
            replication=replication_factor,
        )
        base.err.print(
            f"disclosing to {org} on {target} ({count} partitions) at "
            f"{settings.kafka_bootstrap_servers}"
        )
        channel = KafkaDisclosureChannel(settings, target, org)
        waiter: Waiter = (
            PollingWaiter(settings.relay_poll_interval_ms / 1000)
            if is_sqlite(application.engine)
            else PgNotifyWaiter(application.engine)
        )
        publisher = DisclosurePublisher(
            application.store,
            SqlDisclosureRecord(application.engine),
            channel,
            org=org,
            batch_size=settings.relay_batch_size,
            waiter=waiter,
        )
        stop = threading.Event()
        previous = {
            signum: signal.signal(signum, lambda *_: stop.set())
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            stats = _run(publisher, stop, follow=follow, org=org, target=target)
            if stats.foreign:
                base.err.print(
                    f"warning: {stats.foreign} message(s) on {target} were not written by this "
                    "publisher: see the log above"
                )
        finally:
            channel.close()
            waiter.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _run(
    publisher: DisclosurePublisher, stop: Event, *, follow: bool, org: str, target: str
) -> DisclosureStats:
    """Drain once, or follow until stopped; print progress lines like `continuum relay`."""
    from continuum.application.relay import PublishInterrupted
    from continuum.entrypoints import cli as base

    began, start_count = [dt.datetime.now(dt.UTC)], [0]

    def report(stats: DisclosureStats) -> None:
        now = dt.datetime.now(dt.UTC)
        rate = (stats.disclosed - start_count[0]) / max((now - began[0]).total_seconds(), 1e-9)
        began[0], start_count[0] = now, stats.disclosed
        base.err.print(
            f"disclosed {stats.disclosed} events; checkpoint {stats.checkpoint}; "
            f"lag {stats.lag}; {rate:,.0f} events/s"
        )

    if follow:
        stats = publisher.run(stop, on_progress=report)
        base.out.print(
            f"stopped: disclosed {stats.disclosed} events to {org} on {target}; "
            f"checkpoint {stats.checkpoint}; lag {stats.lag}"
        )
        return stats
    try:
        disclosed = publisher.drain(stop)
    except PublishInterrupted:
        disclosed = publisher.stats.disclosed
    stats = publisher.stats
    recovered = (
        f" ({stats.recovered} found on the topic after a restart, not sent again)"
        if stats.recovered
        else ""
    )
    base.out.print(
        f"disclosed {disclosed} events to {org} on {target}{recovered}; "
        f"checkpoint {stats.checkpoint}"
    )
    return stats
