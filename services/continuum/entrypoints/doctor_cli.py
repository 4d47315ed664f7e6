"""`continuum doctor`: check a deployment and say what to fix. Registered in cli.py.

The checks are continuum.application.doctor's; this module wires them to the real database
and broker, prints them, and exits 1 if any FAILed (0 otherwise, WARNs included), which is
also what a container health check expects.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from continuum.application.doctor import CheckName, Report, Status

if TYPE_CHECKING:  # kafka-python is imported only when the broker is checked
    from continuum.adapters.kafka.probe import KafkaBrokerProbe

#: Exit status when a check FAILs (a container health check reads 1 as "unhealthy").
EXIT_FAILED = 1

_MARKS = {Status.OK: "OK", Status.WARN: "WARN", Status.FAIL: "FAIL", Status.SKIP: "SKIP"}


class DoctorFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


def render_text(report: Report) -> list[str]:
    width = max((len(r.name) for r in report.results), default=0)
    lines = []
    for result in report.results:
        lines.append(f"{_MARKS[result.status]:<4}  {result.name:<{width}}  {result.summary}")
        if result.fix and result.status in (Status.WARN, Status.FAIL):
            lines.append(f"{'':<4}  {'':<{width}}  fix: {result.fix}")
    counts = report.counts()
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n or s != Status.SKIP))
    return lines


def doctor(
    check: Annotated[
        list[CheckName] | None,
        typer.Option(
            "--check",
            help="Run only this check (repeatable); the configuration is always checked.",
        ),
    ] = None,
    kafka: Annotated[
        bool | None,
        typer.Option(
            "--kafka/--no-kafka",
            help="Check the broker, topics and groups (default: when "
            "CONTINUUM_KAFKA_BOOTSTRAP_SERVERS is set).",
            show_default=False,
        ),
    ] = None,
    ingest: Annotated[
        bool,
        typer.Option(
            "--ingest/--no-ingest", help="Check the ADT feed's topics and the ingest group."
        ),
    ] = True,
    partitions: Annotated[
        int, typer.Option(min=1, help="Partitions each topic should have (and is created with).")
    ] = 6,
    replication_factor: Annotated[
        int, typer.Option(min=1, help="Replication factor suggested for missing topics.")
    ] = 1,
    max_lag: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Lag beyond which a check FAILs (default CONTINUUM_API_MAX_PROJECTION_LAG); "
            "any smaller lag is a WARN.",
        ),
    ] = None,
    group: Annotated[
        str, typer.Option(help="The Kafka projection workers' consumer group.")
    ] = "continuum-projections",
    timeout: Annotated[
        float, typer.Option(min=0.5, max=300, help="Seconds to wait for the database or broker.")
    ] = 5.0,
    fmt: Annotated[DoctorFormat, typer.Option("--format", help="Output format.")] = (
        DoctorFormat.TEXT
    ),
) -> None:
    """Check configuration, database and schema, broker, topics and lag; say what to fix.

    Each check prints OK, WARN or FAIL (SKIP when what it needs failed) and, when something is
    wrong, the fix. Exits 1 if any check FAILs, else 0."""
    import logging

    from continuum.adapters.sql.migrate import head_revision
    from continuum.adapters.sql.probe import (
        SqlDatabaseProbe,
        SqlReadModelProbe,
        known_revisions,
    )
    from continuum.application.doctor import Options, Ports, diagnose
    from continuum.entrypoints.cli import out
    from continuum.settings import Settings

    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the checks report broker failures
    closers: list[SqlDatabaseProbe | SqlReadModelProbe | KafkaBrokerProbe] = []

    def database(settings: Settings) -> SqlDatabaseProbe:
        probe = SqlDatabaseProbe(settings.database_url, timeout)
        closers.append(probe)
        return probe

    def read_model(settings: Settings) -> SqlReadModelProbe:
        probe = SqlReadModelProbe(settings.read_model_url or settings.database_url, timeout)
        closers.append(probe)
        return probe

    def broker(settings: Settings) -> KafkaBrokerProbe:
        from continuum.adapters.kafka import probe as kafka_probe

        probe = kafka_probe.KafkaBrokerProbe(settings, timeout)
        closers.append(probe)
        return probe

    options = Options(
        only=frozenset(check or ()),
        kafka=kafka,
        ingest=ingest,
        partitions=partitions,
        replication=replication_factor,
        max_lag=max_lag,
        projection_group=group,
    )
    ports = Ports(database, read_model, broker, head_revision(), known_revisions())
    try:
        report = diagnose(Settings, os.environ, ports, options)
    finally:
        for probe in closers:
            probe.close()
    if fmt is DoctorFormat.JSON:
        out.print(json.dumps(report.to_json_dict(), indent=1), markup=False)
    else:
        for line in render_text(report):
            out.print(line, markup=False)
    if report.failed:
        raise typer.Exit(EXIT_FAILED)
