"""Read-model commands: census, audit trail, metrics, the projection worker and replay.
Registered in cli.py, whose error handling and wiring they use (imported when they run).

The read models live in CONTINUUM_READ_MODEL_URL (default: the event store's database). The
report commands first bring a store-fed read model up to date with the log, so what they print
is never stale; `--no-catch-up` reads it as it is (for a read model fed by a Kafka worker).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import html
import io
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from continuum.domain.errors import InvalidInput

if TYPE_CHECKING:
    from continuum.application.ports import EventStore
    from continuum.application.verify import Finding
    from continuum.bootstrap import App
    from continuum.domain.policy import PolicyRegistry
    from continuum.settings import Settings
    from continuum_projections.readmodel import ReadModel
    from continuum_projections.reports import Capacity, Census, DailyCensus
    from continuum_projections.runners import Progress

audit_app = typer.Typer(help="Audit reports from the read models.", no_args_is_help=True)


class ReportFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class TrailFormat(StrEnum):
    CSV = "csv"
    JSON = "json"
    HTML = "html"


class Source(StrEnum):
    STORE = "store"
    KAFKA = "kafka"


def parse_moment(value: str | None, *, field: str, end_of_day: bool = False) -> dt.datetime | None:
    """ISO 8601 date or date-time; a date means its midnight UTC (or the next, for `end_of_day`);
    a time without offset is UTC."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            moment = dt.datetime.combine(day, dt.time(), dt.UTC)
            return moment + dt.timedelta(days=1) if end_of_day else moment
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{field} {value!r} is not an ISO 8601 date (2026-03-01) or date-time "
            "(2026-03-01T12:00:00Z)",
            field=field,
            value=value,
        ) from None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


# -- wiring ------------------------------------------------------------------------------------


@contextmanager
def _read_model(application: App, url: str | None = None) -> Iterator[ReadModel]:
    from continuum.adapters.sql.database import create_database_engine
    from continuum_projections.readmodel import ReadModel

    target = url or application.settings.read_model_url
    if target is None:
        model = ReadModel(application.engine)
        model.create()
        yield model
        return
    engine = create_database_engine(target)
    try:
        model = ReadModel(engine)
        model.create()
        yield model
    finally:
        engine.dispose()


def _catch_up(application: App, model: ReadModel, *, quiet: bool = False) -> None:
    from continuum_projections.runners import StoreRunner

    source = model.source()
    if source not in (None, "store"):
        from continuum.entrypoints.cli import err

        err.print(f"read model fed by {source}: not catching up from the store", markup=False)
        return
    runner = StoreRunner(application.store, model, application.policies)
    lag = runner.lag()
    if lag == 0:
        return
    with _progress_bar(f"projecting {lag:,} new events", lag, quiet=quiet) as tick:
        runner.run(on_progress=tick)


@contextmanager
def _progress_bar(label: str, total: int | None, *, quiet: bool = False) -> Iterator[Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    from continuum.entrypoints.cli import err

    if quiet:
        yield lambda _progress: None
        return
    with Bar(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=total, rate="")

        def tick(progress: Progress) -> None:
            # A restarted store runner first folds again what it had written (`refolded`).
            done = progress.events + progress.skipped + progress.refolded
            target = progress.target or total
            bar.update(task, completed=done, total=target, rate=f"{progress.rate:,.0f} ev/s")

        yield tick


def _capacity(application: App) -> Capacity | None:
    from continuum_projections.reports import Capacity

    path = application.settings.capacity_file
    return Capacity.load(path) if path is not None else None


def _level_order(application: App) -> list[str]:
    return [level.code for level in application.policies.default.levels]


CatchUp = Annotated[
    bool,
    typer.Option(
        "--catch-up/--no-catch-up",
        help="Bring the read model up to date with the log first (store-fed read models).",
    ),
]


# -- census ------------------------------------------------------------------------------------


def census(
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="The census as the log stood at this recorded time (ISO 8601; UTC if no offset).",
        ),
    ] = None,
    clinical: Annotated[
        bool,
        typer.Option(
            "--clinical",
            help="With --as-of: who was in care at that clinical time, as the log knows it now "
            "(instead of what the log said at that recorded time).",
        ),
    ] = False,
    daily: Annotated[
        bool, typer.Option("--daily", help="The daily census (midnight UTC) per level instead.")
    ] = False,
    days: Annotated[int, typer.Option(min=1, max=3660, help="With --daily: how many days.")] = 90,
    until: Annotated[
        str | None, typer.Option("--until", help="With --daily: the last day (default today).")
    ] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="Output format.")] = (
        ReportFormat.TEXT
    ),
    catch_up: CatchUp = True,
) -> None:
    """Active patients by level, site, program and age group (and occupancy against capacity
    when CONTINUUM_CAPACITY_FILE is set)."""
    from continuum.entrypoints.cli import _app, _errors, out
    from continuum_projections import reports

    with _app() as application, _errors():
        moment = parse_moment(as_of, field="as_of")
        last_day = parse_moment(until, field="until")
        capacity = _capacity(application)
        with _read_model(application) as model:
            if catch_up:
                _catch_up(application, model, quiet=fmt is ReportFormat.JSON)
            with model.engine.connect() as conn:
                if daily:
                    end = (last_day or dt.datetime.now(dt.UTC)).date()
                    history = reports.daily_census(conn, end - dt.timedelta(days=days - 1), end)
                else:
                    order = _level_order(application)
                    if moment is None:
                        snapshot = reports.current_census(
                            conn, capacity=capacity, level_order=order
                        )
                    elif clinical:
                        snapshot = reports.census_in_care_at(
                            conn, moment, capacity=capacity, level_order=order
                        )
                    else:
                        snapshot = reports.census_as_of(
                            conn, moment, capacity=capacity, level_order=order
                        )
        if daily:
            if fmt is ReportFormat.JSON:
                out.print_json(json.dumps(history.to_json_dict()))
            else:
                _print_daily(history, _level_order(application), days, end)
            return
        if fmt is ReportFormat.JSON:
            out.print_json(json.dumps(snapshot.to_json_dict()))
        else:
            _print_census(snapshot, application)


def _print_daily(history: DailyCensus, order: list[str], days: int, end: dt.date) -> None:
    from rich.table import Table

    from continuum.entrypoints.cli import out

    average = history.average()
    levels = [code for code in order if code in average]
    table = Table(title=f"Daily census at midnight UTC, {days} days to {end}")
    table.add_column("date")
    for code in levels:
        table.add_column(code, justify="right")
    table.add_column("total", justify="right")
    for day in history.days:
        row = history.counts[day]
        table.add_row(
            day.isoformat(), *[str(row.get(c, 0)) for c in levels], str(sum(row.values()))
        )
    table.add_row("average", *[f"{average.get(c, 0):g}" for c in levels], "", style="bold")
    out.print(table)


def _print_census(snapshot: Census, application: App) -> None:
    from rich.table import Table

    from continuum.entrypoints.cli import out

    names = {level.code: level.name for level in application.policies.default.levels}
    table = Table(title=f"Census as of {snapshot.as_of:%Y-%m-%d %H:%M} UTC")
    table.add_column("level")
    table.add_column("name")
    table.add_column("patients", justify="right")
    for code, count in snapshot.levels().items():
        table.add_row(code, names.get(code, ""), str(count))
    table.add_row("", "total", str(snapshot.total), style="bold")
    out.print(table)
    by_site = snapshot.by(1)
    if by_site:
        sites = Table(title="By site")
        sites.add_column("site")
        sites.add_column("levels")
        sites.add_column("patients", justify="right")
        for site, counts in by_site.items():
            listing = ", ".join(f"{k}: {v}" for k, v in counts.items())
            sites.add_row(site, listing, str(sum(counts.values())))
        out.print(sites)
    occupancy = snapshot.occupancy()
    if occupancy:
        occ = Table(title="Occupancy against capacity")
        for column in ("site", "level", "patients", "capacity", "occupancy"):
            occ.add_column(column, justify="left" if column in ("site", "level") else "right")
        for row in occupancy:
            share = f"{row['occupancy']:.0%}" if row["occupancy"] is not None else "-"
            occ.add_row(
                row["site"],
                row["level"],
                str(row["patients"]),
                str(row["capacity"]),
                share,
                style="bold red" if row["over_capacity"] else None,
            )
        out.print(occ)


# -- audit trail -------------------------------------------------------------------------------


@audit_app.command("trail")
def audit_trail(
    start: Annotated[
        str | None, typer.Option("--from", help="First day (or moment) included, clinical time.")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="Last day included (or moment excluded).")
    ] = None,
    fmt: Annotated[TrailFormat, typer.Option("--format", help="Output format.")] = TrailFormat.CSV,
    flagged: Annotated[bool, typer.Option("--flagged", help="Only rows with a flag.")] = False,
    output: Annotated[
        Path | None, typer.Option(help="Write to this file (default stdout).")
    ] = None,
    catch_up: CatchUp = True,
) -> None:
    """The step-down audit trail: one row per transition and readmission, with the
    reassessment it rested on and its audit flags."""
    from continuum.entrypoints.cli import _app, _errors, err, record_access
    from continuum_projections import reports

    with _app() as application, _errors():
        first = parse_moment(start, field="from")
        last = parse_moment(end, field="to", end_of_day=True)
        with _read_model(application) as model:
            if catch_up:
                _catch_up(application, model, quiet=True)
            with model.engine.connect() as conn:
                rows = reports.audit_trail(conn, first, last, flagged_only=flagged)
        record_access(
            application,
            "audit_trail.read",
            f"audit trail --from {start} --to {end}",
            records=len(rows),
        )
        text = render_trail(rows, fmt, title=_trail_title(first, last))
        if output is not None:
            output.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        err.print(f"{len(rows)} rows", markup=False)


def _trail_title(first: dt.datetime | None, last: dt.datetime | None) -> str:
    span = f"{first:%Y-%m-%d}" if first else "the start"
    span += f" to {last:%Y-%m-%d %H:%M} (excluded)" if last else " to now"
    return f"Step-down audit trail, {span}"


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "yes" if value else ""
    return str(value)


def render_trail(rows: list[dict[str, Any]], fmt: TrailFormat, *, title: str = "") -> str:
    from continuum_projections.reports import TRAIL_COLUMNS

    if fmt is TrailFormat.JSON:
        return (
            json.dumps(
                [
                    {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in r.items()}
                    for r in rows
                ],
                indent=1,
            )
            + "\n"
        )
    if fmt is TrailFormat.CSV:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(TRAIL_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    ("true" if row[c] else "false") if isinstance(row[c], bool) else _cell(row[c])
                    for c in TRAIL_COLUMNS
                ]
            )
        return buffer.getvalue()
    head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in TRAIL_COLUMNS)
    body = []
    for row in rows:
        flagged = any(row[c] for c in TRAIL_COLUMNS if c.startswith("flag_"))
        css = ' class="voided"' if row["voided"] else (' class="flagged"' if flagged else "")
        cells = "".join(f"<td>{html.escape(_cell(row[c]))}</td>" for c in TRAIL_COLUMNS)
        body.append(f"<tr{css}>{cells}</tr>")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;color:#111}table{border-collapse:collapse;"
        "font-size:13px}th,td{border:1px solid #999;padding:2px 4px;text-align:left}"
        "tr.flagged{background:#fff3c4}tr.voided td{text-decoration:line-through;color:#555}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(rows)} rows. Flagged rows are shaded; voided "
        "rows are struck through.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        "</body></html>\n"
    )


# -- metrics -----------------------------------------------------------------------------------


def metrics(
    start: Annotated[
        str | None, typer.Option("--from", help="First day (or moment) included.")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="Last day included (or moment excluded).")
    ] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="Output format.")] = (
        ReportFormat.TEXT
    ),
    catch_up: CatchUp = True,
) -> None:
    """Outcome metrics over stays and episodes that ended in the range: length of stay (TEDS
    method), step-down and step-up rates, completion, AMA and 30-day readmission."""
    from rich.table import Table

    from continuum.entrypoints.cli import _app, _errors, out
    from continuum_projections import reports

    with _app() as application, _errors():
        first = parse_moment(start, field="from")
        last = parse_moment(end, field="to", end_of_day=True)
        with _read_model(application) as model:
            if catch_up:
                _catch_up(application, model, quiet=fmt is ReportFormat.JSON)
            with model.engine.connect() as conn:
                result = reports.outcome_metrics(
                    conn, first, last, level_order=_level_order(application)
                )
        data = result.to_json_dict()
        if fmt is ReportFormat.JSON:
            out.print_json(json.dumps(data))
            return
        table = Table(title="Stays ended in the range, by level")
        for column in ("level", "stays", "LOS median", "LOS mean", "step-down", "step-up"):
            table.add_column(column, justify="left" if column == "level" else "right")
        for level, stat in result.los_by_level.items():
            exits = result.exits_by_level[level]
            table.add_row(
                level,
                str(stat.n),
                f"{stat.median:g}",
                f"{stat.mean:g}",
                f"{exits['step_down_rate']:.1%}",
                f"{exits['step_up_rate']:.1%}",
            )
        out.print(table)
        ep = result.los_episode
        out.print(
            f"episodes discharged: {result.discharges}; episode LOS median "
            f"{ep.median if ep.median is not None else '-'} d, mean "
            f"{ep.mean if ep.mean is not None else '-'} d",
            markup=False,
        )
        readmission = data["readmission_30d"]
        for label, value in (
            ("completion rate", data["completion_rate"]),
            ("AMA rate", data["ama_rate"]),
            ("30-day readmission", readmission["rate"]),
        ):
            out.print(f"{label}: {value:.1%}" if value is not None else f"{label}: -")
        if readmission["follow_up_incomplete"]:
            out.print(
                f"({readmission['follow_up_incomplete']} discharges have less than 30 days of "
                "follow-up in the log)",
                markup=False,
            )


# -- the worker and replay ---------------------------------------------------------------------


def project(
    source: Annotated[Source, typer.Option(help="Where events come from.")] = Source.STORE,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep running, projecting new events as they come.")
    ] = False,
    status: Annotated[
        bool, typer.Option("--status", help="Print the lag and exit; project nothing.")
    ] = False,
    topic: Annotated[str | None, typer.Option(help="Events topic (kafka source).")] = None,
    group: Annotated[
        str, typer.Option(help="Consumer group (kafka source).")
    ] = "continuum-projections",
    flush_every: Annotated[
        int, typer.Option(min=1, help="Events per read-model transaction (with its checkpoint).")
    ] = 50_000,
) -> None:
    """The projection worker: bring the read models up to date from the store or from the
    events topic (as one member of a consumer group), and keep them so with --follow."""
    from continuum.entrypoints.cli import _app, _errors, err, out

    with _app() as application, _errors(), _read_model(application) as model:
        stop = _stop_on_signals()
        if source is Source.STORE:
            from continuum_projections.runners import StoreRunner

            runner = StoreRunner(
                application.store, model, application.policies, flush_every=flush_every
            )
            if status:
                out.print(json.dumps({"source": "store", "lag": runner.lag()}))
                return
            if follow:
                from continuum.adapters.sql.database import is_sqlite
                from continuum.adapters.sql.notify import PgNotifyWaiter

                waiter = (
                    None if is_sqlite(application.engine) else PgNotifyWaiter(application.engine)
                )
                try:
                    runner.follow(
                        stop,
                        wait=waiter.wait if waiter else None,
                        on_progress=_log_progress(err),
                    )
                finally:
                    if waiter:
                        waiter.close()
            else:
                with _progress_bar("projecting", runner.lag()) as tick:
                    runner.run(stop=stop, on_progress=tick)
            out.print(
                f"projected {runner.progress.events} events; lag {runner.lag()}", markup=False
            )
            return
        kafka = _kafka_runner(application, model, topic, group, flush_every=flush_every)
        try:
            if status:
                lag = kafka.lag()
                total = sum(lag.values())
                out.print(json.dumps({"source": kafka.topic, "lag": lag, "total": total}))
                return
            if follow:
                kafka.run(stop=stop, on_progress=_log_progress(err, every_s=10))
            else:
                with _progress_bar("projecting", None) as tick:
                    kafka.run(stop=stop, until_end=True, on_progress=tick)
            out.print(
                f"projected {kafka.progress.events} events; lag {sum(kafka.lag().values())}",
                markup=False,
            )
        finally:
            kafka.consumer.close()


def replay(
    into: Annotated[
        str, typer.Option("--into", help="Database URL to rebuild the read models in.")
    ],
    source: Annotated[Source, typer.Option(help="Replay from the store or the topic.")] = (
        Source.STORE
    ),
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Only events recorded at or before this time (ISO 8601)."),
    ] = None,
    topic: Annotated[str | None, typer.Option(help="Events topic (kafka source).")] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="Drop the read models found there first.")
    ] = True,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=16,
            help="Store source: fold in this many processes, each a share of the patients "
            "(about one per core). A stopped or failed run goes on when run again with "
            "--no-reset.",
        ),
    ] = 1,
) -> None:
    """Rebuild every read model from the log into a separate database, with progress."""
    from continuum.entrypoints.cli import _app, _errors, out, record_access

    with _app() as application, _errors():
        moment = parse_moment(as_of, field="as_of")
        if workers > 1 and source is not Source.STORE:
            raise InvalidInput(
                "--workers splits a rebuild from the store; the topic is already split by "
                "partition: run several `continuum project --source kafka` workers instead",
                field="workers",
                rule="replay.workers_need_store",
            )
        with _read_model(application, into) as model:
            if reset:
                model.reset()
            stop = _stop_on_signals()
            started = time.monotonic()
            if source is Source.STORE and workers > 1:
                from continuum_projections.parallel import rebuild

                until = application.store.head_position()
                opener = functools.partial(open_replay_parts, application.settings, into)
                with _progress_bar(f"replaying the store ({workers} workers)", until) as tick:
                    progress = rebuild(
                        opener, workers, until=until, as_of=moment, on_progress=tick, stop=stop
                    )
                if progress.position < until:
                    from continuum.entrypoints.cli import err

                    err.print(
                        f"stopped at position {progress.position} of {until}: run the same "
                        "replay with --no-reset to go on (each worker resumes from its "
                        "checkpoint)",
                        markup=False,
                    )
            elif source is Source.STORE:
                from continuum_projections.runners import StoreRunner

                runner = StoreRunner(application.store, model, application.policies, as_of=moment)
                with _progress_bar("replaying the store", runner.lag()) as tick:
                    progress = runner.run(stop=stop, on_progress=tick)
            else:
                group = f"continuum-replay-{uuid.uuid4().hex[:12]}"
                kafka = _kafka_runner(application, model, topic, group, as_of=moment)
                try:
                    with _progress_bar("replaying the topic", None) as tick:
                        progress = kafka.run(stop=stop, until_end=True, on_progress=tick)
                finally:
                    kafka.consumer.close()
            elapsed = time.monotonic() - started
            record_access(
                application,
                "log.replay",
                f"replay --source {source.value} into {_safe_url(into)}",
                records=progress.events,
            )
            out.print(
                f"replayed {progress.events} events ({progress.skipped} skipped"
                + (f" after {moment.isoformat()}" if moment else "")
                + f") in {elapsed:.1f} s into {_safe_url(into)}",
                markup=False,
            )


@contextmanager
def open_replay_parts(
    settings: Settings, into: str
) -> Iterator[tuple[EventStore, ReadModel, PolicyRegistry]]:
    """A parallel rebuild's shard (in its own process) opens the store and the read model."""
    from continuum.bootstrap import bootstrap

    application = bootstrap(settings, migrate=False)
    try:
        with _read_model(application, into) as model:
            yield application.store, model, application.policies
    finally:
        application.close()


def projection_check(application: App) -> list[Finding]:
    """`continuum verify` (2): rebuild the read models from the log, up to the live read
    model's checkpoint, in a scratch database, and list every difference from the live one."""
    import tempfile

    from continuum.adapters.sql.database import create_database_engine
    from continuum.application.verify import Finding
    from continuum_projections.compare import diff_read_models
    from continuum_projections.readmodel import STORE_CHECKPOINT, ReadModel
    from continuum_projections.runners import StoreRunner

    with _read_model(application) as live:
        source = live.source()
        if source is None:
            return []  # nothing projected yet: nothing to compare
        if source != STORE_CHECKPOINT:
            return [
                Finding(
                    kind="projection_not_compared",
                    position=None,
                    event_id=None,
                    message=f"the read model is fed by {source}; only store-fed read models "
                    "are compared (rebuild it from the store to compare)",
                    severity="warning",
                )
            ]
        position = live.checkpoint(STORE_CHECKPOINT)
        with tempfile.TemporaryDirectory(prefix="continuum-verify-") as scratch:
            engine = create_database_engine(f"sqlite:///{Path(scratch) / 'rebuilt.sqlite3'}")
            try:
                rebuilt = ReadModel(engine)
                rebuilt.create()
                StoreRunner(application.store, rebuilt, application.policies).run(until=position)
                differences = diff_read_models(engine, live.engine)
            finally:
                engine.dispose()
    return [
        Finding(
            kind="projection",
            position=position,
            event_id=None,
            message=f"rebuilt read model differs from the live one at {d}",
            detail={"table": d.table, "key": d.key},
        )
        for d in differences
    ]


def _kafka_runner(
    application: App,
    model: ReadModel,
    topic: str | None,
    group: str,
    *,
    as_of: dt.datetime | None = None,
    flush_every: int = 50_000,
) -> Any:
    from continuum.adapters.kafka import clients
    from continuum_projections.runners import KafkaRunner

    settings = application.settings
    consumer = clients.consumer(settings, group=group, max_poll_records=5_000)
    try:
        runner = KafkaRunner(
            consumer,
            topic or settings.events_topic,
            model,
            application.policies,
            as_of=as_of,
            flush_every=flush_every,
        )
    except BaseException:
        consumer.close()
        raise

    def fenced(stale: Exception) -> None:
        from continuum.entrypoints.cli import err

        err.print(f"warning: {stale}", markup=False)

    runner.on_fenced = fenced
    return runner


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(url)"


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_signum: int, _frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    return stop


def _log_progress(console: Any, every_s: float = 10.0) -> Any:
    last = [0.0]

    def tick(progress: Progress) -> None:
        now = time.monotonic()
        if (progress.events or progress.refolded) and now - last[0] >= every_s:
            last[0] = now
            again = f", {progress.refolded} folded again" if progress.refolded else ""
            console.print(
                f"projected {progress.events} events ({progress.rate:,.0f} ev/s){again}, "
                f"position {progress.position}",
                markup=False,
            )

    return tick
