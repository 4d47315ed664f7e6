"""CLI reads of patient-level data (history, log export, audit trail, replay) are recorded in
the access log like API reads: who (CONTINUUM_ACTOR_ID / _ROLE), what, when, why, how many."""

from __future__ import annotations

from pathlib import Path

from continuum.adapters.sql.access_log import SqlAccessLog
from continuum.adapters.sql.database import create_database_engine
from tests.e2e.test_cli import Cli


def test_cli_reads_are_recorded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    cli = Cli(url)
    cli.env["CONTINUUM_ACTOR_ROLE"] = "auditor"
    key = cli.admit()
    cli.admit()
    cli("history", key)
    exported = cli("log", "export").stdout.splitlines()
    cli("audit", "trail", "--format", "json")
    cli("replay", "--into", f"sqlite:///{tmp_path / 'replay.sqlite3'}")

    engine = create_database_engine(url)
    try:
        entries = SqlAccessLog(engine).query()
    finally:
        engine.dispose()
    assert [(e.action, e.channel, e.subject, e.role, e.purpose) for e in entries] == [
        ("patient.timeline", "cli", "cm-test", "auditor", "HCOMPL"),
        ("log.export", "cli", "cm-test", "auditor", "HCOMPL"),
        ("audit_trail.read", "cli", "cm-test", "auditor", "HCOMPL"),
        ("log.replay", "cli", "cm-test", "auditor", "HCOMPL"),
    ]
    assert entries[0].patient_key == key
    assert entries[1].records == len(exported) == 2
    assert entries[3].records == 2
