"""`continuum seal` and `continuum verify`: the hash chain over the log, and the audit that
checks the stored log against it and the events topic against the store (docs/verify.md).
Registered in `cli.py`; uses cli.py's error handling and wiring, imported when a command runs.

Extra checks: `verify` also runs every callable in `EXTRA_CHECKS` (or passed to `run_verify`):
each gets the application and returns `Finding`s. This is where "(2) a rebuilt projection
compared to the live one" plugs in; its findings exit with EXIT_EXTRA_CHECK.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from continuum.application.verify import (
    CHAIN_KINDS,
    TOPIC_KINDS,
    ChainReport,
    Finding,
    TopicReport,
)


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


if TYPE_CHECKING:
    from continuum.bootstrap import App

#: Exit codes of `continuum verify` (and `seal`), one per class of finding. When several
#: classes are found, the lowest code wins: a broken chain outranks everything else.
EXIT_CHAIN = 10  # the stored log fails the hash chain: altered, removed, reordered, ...
EXIT_HEAD = 11  # --expect-head does not match the chain
EXIT_TOPIC = 12  # the topic differs from the store: missing, differing or extra messages
EXIT_LAG = 13  # the topic only lags behind the store's head
EXIT_EXTRA_CHECK = 14  # an extra check (e.g. rebuilt versus live projection) found something

#: A check run by `continuum verify` besides the chain and the topic.
ExtraCheck = Callable[["App"], Iterable[Finding]]
#: Checks every `continuum verify` runs; append to register one (the projection comparison).
EXTRA_CHECKS: list[ExtraCheck] = []


def exit_code_for(findings: Iterable[Finding]) -> int:
    codes = {_code_of(f) for f in findings if f.severity == "error"}
    return min(codes) if codes else 0


def _code_of(finding: Finding) -> int:
    if finding.kind in CHAIN_KINDS:
        return EXIT_CHAIN
    if finding.kind == "head_mismatch":
        return EXIT_HEAD
    if finding.kind in TOPIC_KINDS:
        return EXIT_TOPIC
    if finding.kind == "lag":
        return EXIT_LAG
    return EXIT_EXTRA_CHECK


@dataclass
class VerifyResult:
    chain: ChainReport
    topic: TopicReport | None = None
    topic_name: str | None = None
    extra: dict[str, list[Finding]] = field(default_factory=dict)

    @property
    def findings(self) -> list[Finding]:
        found = list(self.chain.findings)
        if self.topic is not None:
            found += self.topic.findings
        for findings in self.extra.values():
            found += findings
        return found

    @property
    def suppressed(self) -> dict[str, int]:
        counts = dict(self.chain.suppressed)
        if self.topic is not None:
            for kind, n in self.topic.suppressed.items():
                counts[kind] = counts.get(kind, 0) + n
        return counts

    @property
    def exit_code(self) -> int:
        code = exit_code_for(self.findings)
        suppressed = [
            _code_of(Finding(kind, None, None, ""))
            for kind in self.suppressed
            if kind != "unsealed"
        ]
        return min([c for c in (code, *suppressed) if c]) if code or suppressed else 0

    def as_dict(self) -> dict[str, Any]:
        chain = self.chain
        return {
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "chain": {
                "checked": chain.checked,
                "sealed": chain.sealed,
                "unsealed": chain.unsealed,
                "store_head": chain.store_head,
                "head_position": chain.head_position,
                "head_hash": chain.head_hash,
                "head": f"{chain.head_position}:{chain.head_hash}",
            },
            "topic": None
            if self.topic is None
            else {
                "name": self.topic_name,
                "messages": self.topic.messages,
                "duplicates": self.topic.duplicates,
                "topic_head": self.topic.topic_head,
                "store_head": self.topic.store_head,
                "lag": self.topic.lag,
            },
            "extra_checks": {name: len(found) for name, found in self.extra.items()},
            "findings": [f.as_dict() for f in self.findings],
            "suppressed": self.suppressed,
        }


def run_verify(
    application: App,
    *,
    topic: str | None,
    bootstrap_servers: str | None = None,
    expect_head: str | None = None,
    extra_checks: Sequence[ExtraCheck] = (),
    progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """The chain, then (unless `topic` is None) the topic, then the extra checks."""
    from continuum.adapters.sql.seals import SqlLogSeals
    from continuum.application.verify import compare_topic, verify_chain

    say = progress or (lambda _line: None)
    began = time.monotonic()

    def chain_progress(done: int, total: int) -> None:
        rate = done / max(time.monotonic() - began, 1e-9)
        say(f"chain: checked {done:,}/{total:,} positions ({rate:,.0f}/s)")

    chain = verify_chain(
        application.store,
        SqlLogSeals(application.engine),
        expect_head=expect_head,
        on_progress=chain_progress,
    )
    result = VerifyResult(chain=chain)
    if topic is not None:
        from continuum.adapters.kafka.topic_reader import KafkaTopicReader

        settings = application.settings
        if bootstrap_servers:
            settings = settings.model_copy(update={"kafka_bootstrap_servers": bootstrap_servers})
        reader = KafkaTopicReader(settings, topic)  # fixes the end offsets first ...
        try:
            head = application.store.head_position()  # ... then the store head
            total = reader.total

            def topic_progress(done: int, _total: int) -> None:
                say(f"topic: read {done:,}/{total:,} messages")

            result.topic = compare_topic(
                application.store, reader.messages(), store_head=head, on_progress=topic_progress
            )
            result.topic_name = topic
        finally:
            reader.close()
    for check in extra_checks:
        name = getattr(check, "__name__", repr(check))
        say(f"running check {name}")
        result.extra[name] = list(check(application))
    return result


def _render_text(result: VerifyResult) -> list[str]:
    chain = result.chain
    lines = [
        f"chain: {chain.checked} positions checked against {chain.sealed} seals; "
        f"{chain.unsealed} unsealed; store head {chain.store_head}",
        f"head: {chain.head_position}:{chain.head_hash}",
    ]
    if result.topic is not None:
        t = result.topic
        lines.append(
            f"topic {result.topic_name}: {t.messages} messages ({t.duplicates} identical "
            f"duplicates); topic head {t.topic_head}, store head {t.store_head}, lag {t.lag}"
        )
    for name, found in result.extra.items():
        lines.append(f"check {name}: {len(found)} finding(s)")
    for finding in result.findings:
        where = f"position {finding.position}" if finding.position is not None else "-"
        eid = f" event {finding.event_id}" if finding.event_id else ""
        lines.append(
            f"{finding.severity.upper():7} {finding.kind:13} {where}{eid}: {finding.message}"
        )
    for kind, count in result.suppressed.items():
        lines.append(f"ERROR   {kind:13} {count} more finding(s) of this kind not listed")
    errors = sum(1 for f in result.findings if f.severity == "error")
    errors += sum(result.suppressed.values())
    lines.append("verify: OK" if result.exit_code == 0 else f"verify: FAILED ({errors} finding(s))")
    return lines


def verify(
    no_topic: Annotated[
        bool, typer.Option("--no-topic", help="Check only the stored log, not the topic.")
    ] = False,
    topic: Annotated[
        str | None, typer.Option(help="Events topic (default CONTINUUM_EVENTS_TOPIC).")
    ] = None,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(help="Kafka host:port list (default CONTINUUM_KAFKA_BOOTSTRAP_SERVERS)."),
    ] = None,
    expect_head: Annotated[
        str | None,
        typer.Option(
            help="Fail unless the chain's head is this HASH, or the seal at POSITION is "
            "HASH (POSITION:HASH, as printed by seal and verify)."
        ),
    ] = None,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="Output format.")
    ] = OutputFormat.TEXT,
) -> None:
    """Check the stored log against its sealed hash chain and the events topic against the
    store; name every altered, removed or reordered event. Exit 0 when clean (unsealed events
    are only a warning), 10 chain broken, 11 head differs from --expect-head, 12 topic differs,
    13 topic lags, 14 an extra check failed (see docs/verify.md)."""
    from continuum.entrypoints import cli as base

    if expect_head is not None:
        from continuum.application.verify import parse_expected_head

        try:
            parse_expected_head(expect_head)
        except ValueError as exc:
            base._fail(3, str(exc))
    with base._app() as application, base._errors():
        result = run_verify(
            application,
            topic=None if no_topic else topic or application.settings.events_topic,
            bootstrap_servers=bootstrap_servers,
            expect_head=expect_head,
            extra_checks=EXTRA_CHECKS,
            progress=base.err.print,
        )
    if fmt == OutputFormat.JSON:
        base.out.print(json.dumps(result.as_dict(), sort_keys=True), markup=False)
    else:
        for line in _render_text(result):
            base.out.print(line, markup=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def seal(
    follow: Annotated[
        bool,
        typer.Option("--follow", help="Keep sealing new events until SIGTERM or Ctrl-C."),
    ] = False,
    batch: Annotated[int, typer.Option(min=1, help="Hashes written per transaction.")] = 1000,
    fmt: Annotated[
        OutputFormat, typer.Option("--format", help="Output format.")
    ] = OutputFormat.TEXT,
) -> None:
    """Extend the hash chain over the log up to its head (idempotent; safe to run twice at
    once). Prints the head POSITION:HASH: write it down elsewhere to anchor the log."""
    import signal
    import threading

    from continuum.adapters.sql.database import is_sqlite
    from continuum.adapters.sql.notify import PgNotifyWaiter
    from continuum.adapters.sql.seals import SqlLogSeals
    from continuum.application.relay import PollingWaiter, Waiter
    from continuum.application.sealing import SealRefused, SealStats
    from continuum.application.sealing import seal as seal_log
    from continuum.entrypoints import cli as base

    with base._app() as application, base._errors():
        seals = SqlLogSeals(application.engine)
        began = time.monotonic()
        shown = [began]

        def report(stats: SealStats) -> None:
            now = time.monotonic()
            if now - shown[0] >= 2.0:
                shown[0] = now
                rate = stats.sealed / max(now - began, 1e-9)
                base.err.print(
                    f"sealed {stats.sealed:,} events to {stats.position} ({rate:,.0f}/s)"
                )

        stop = threading.Event()
        try:
            stats = seal_log(application.store, seals, batch=batch, on_progress=report, stop=stop)
            if follow:
                waiter: Waiter = (
                    PollingWaiter(application.settings.relay_poll_interval_ms / 1000)
                    if is_sqlite(application.engine)
                    else PgNotifyWaiter(application.engine)
                )
                previous = {
                    signum: signal.signal(signum, lambda *_: stop.set())
                    for signum in (signal.SIGTERM, signal.SIGINT)
                }
                base.err.print(f"sealed to {stats.position}:{stats.head}; following")
                try:
                    total = stats.sealed
                    while not stop.is_set():
                        waiter.wait(5.0)
                        more = seal_log(application.store, seals, batch=batch, stop=stop)
                        if more.sealed:
                            total += more.sealed
                            base.err.print(
                                f"sealed {more.sealed} more to {more.position}:{more.head}"
                            )
                        stats = SealStats(total, more.position, more.head, stats.conflicts)
                finally:
                    waiter.close()
                    for signum, handler in previous.items():
                        signal.signal(signum, handler)
        except SealRefused as exc:
            base._fail(EXIT_CHAIN, str(exc), exc.as_dict())
    if fmt == OutputFormat.JSON:
        payload = {
            "sealed": stats.sealed,
            "head_position": stats.position,
            "head_hash": stats.head,
            "head": f"{stats.position}:{stats.head}",
        }
        base.out.print(json.dumps(payload, sort_keys=True), markup=False)
    else:
        base.out.print(f"sealed {stats.sealed} events; head {stats.position}:{stats.head}")
