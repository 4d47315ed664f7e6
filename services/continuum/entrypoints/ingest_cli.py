"""`continuum ingest`: the hospital ADT feed into commands. Registered in `cli.py`.

Kept apart from cli.py; it uses cli.py's error handling and application wiring, imported when
the command runs (cli.py imports this module to register the command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def ingest(
    topic: Annotated[
        str | None, typer.Option(help="Feed topic (default CONTINUUM_ADT_TOPIC).")
    ] = None,
    group: Annotated[
        str | None, typer.Option(help="Consumer group (default CONTINUUM_INGEST_GROUP).")
    ] = None,
    mapping: Annotated[
        Path | None,
        typer.Option(
            help="ADT mapping TOML (default CONTINUUM_ADT_MAPPING, else the bundled synthetic "
            "example)."
        ),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Read every partition to its end, then exit.")
    ] = False,
    max_messages: Annotated[
        int | None, typer.Option(min=1, help="Exit after handling this many messages.")
    ] = None,
    create_topic: Annotated[
        bool,
        typer.Option(
            "--create-topic", help="Create the feed topic and its .dlq if missing (development)."
        ),
    ] = False,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions for --create-topic.")] = 6,
    replication_factor: Annotated[int, typer.Option(min=1, help="For --create-topic.")] = 1,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Log every message handled (codes only).")
    ] = False,
) -> None:
    """Consume the hospital ADT feed (HL7 v2 or JSON) and record what it says.

    A01/A04 admit, A02/A06/A07 move, A03 discharge, A08 update identity, A11/A12/A13 cancel.
    A message that cannot be parsed or mapped goes to <topic>.dlq with the reason in its
    headers; consumption goes on. Offsets are committed only after the commands committed.
    Stops cleanly on SIGTERM or Ctrl-C."""
    import logging
    import signal
    import threading

    from continuum.adapters.kafka.clients import ensure_topic
    from continuum.adapters.kafka.ingest import IngestStats, KafkaIngest, dlq_topic_for
    from continuum.entrypoints import cli as base
    from continuum.ingest.mapping import load_mapping
    from continuum.ingest.processor import AdtIngestor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("kafka", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("continuum.ingest").setLevel(logging.DEBUG if verbose else logging.INFO)

    settings = base._settings()
    with base._errors():
        adt_mapping = load_mapping(mapping or settings.adt_mapping)
    with base._app() as application, base._errors():
        adt_mapping.check_levels(application.policies.default)
        source = topic or settings.adt_topic
        dlq = dlq_topic_for(source)
        counts = [
            ensure_topic(
                settings,
                name,
                create=create_topic,
                partitions=partitions,
                replication=replication_factor,
            )
            for name in (source, dlq)
        ]
        runner = KafkaIngest(
            settings,
            AdtIngestor(application.service, adt_mapping),
            topic=source,
            group=group or settings.ingest_group,
            dlq_topic=dlq,
        )
        base.err.print(
            f"ingesting {source} ({counts[0]} partitions) as group {runner.group} at "
            f"{settings.kafka_bootstrap_servers}; dead letters to {dlq}"
        )
        stop = threading.Event()
        previous = {
            signum: signal.signal(signum, lambda *_: stop.set())
            for signum in (signal.SIGTERM, signal.SIGINT)
        }

        def report(stats: IngestStats) -> None:
            base.err.print(stats.line())

        try:
            stats = runner.run(stop, max_messages, until_idle=once, on_progress=report)
        finally:
            runner.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        base.out.print(stats.line())
