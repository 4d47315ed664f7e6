"""The `continuum` CLI end to end, on SQLite (the embedded default) and on PostgreSQL.

Commands run in-process through typer's runner (same code as the console script); one test
runs the installed console script itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import head_revision
from continuum.entrypoints.cli import app
from tests.support import ENVELOPE_FIELDS

runner = CliRunner()


class Cli:
    def __init__(self, database_url: str) -> None:
        self.env = {"CONTINUUM_DATABASE_URL": database_url, "CONTINUUM_ACTOR_ID": "cm-test"}

    def __call__(self, *args: str, code: int = 0) -> Any:
        result = runner.invoke(app, list(args), env=self.env)
        assert result.exit_code == code, (
            f"continuum {' '.join(args)} exited {result.exit_code}, expected {code}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\n{result.exception!r}"
        )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--format", "json").stdout)

    def admit(self, *extra: str) -> str:
        out = self.json(
            "admit",
            "--level=3.5",
            "--site=site-a",
            "--ratings=0,0,1,0,4,0",
            "--occurred-at=2026-10-01T09:00:00+00:00",
            *extra,
        )
        return str(out["patient_key"])

    def export(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self("log", "export").stdout.splitlines()]


@pytest.fixture
def sqlite_cli(tmp_path: Path) -> Cli:
    return Cli(f"sqlite:///{tmp_path / 'cli.sqlite3'}")


@pytest.fixture
def postgres_cli(pg_url: str) -> Iterator[Cli]:
    schema = f"cli_{uuid.uuid4().hex[:10]}"
    admin = create_database_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_url else "?"
    yield Cli(f"{pg_url}{sep}options=-csearch_path%3D{schema}")
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def cli(request: pytest.FixtureRequest) -> Cli:
    cli: Cli = request.getfixturevalue(f"{request.param}_cli")
    if request.param == "postgres":
        cli("db", "upgrade")
    return cli


def test_a_whole_journey(cli: Cli) -> None:
    pk = cli.admit("--given-name=Synthetic", "--family-name=Person", "--birth-date=1990-01-01")
    reassessed = cli.json(
        "reassess",
        pk,
        "--ratings=0,0,1,2,0,0",
        "--hours=12",
        "--occurred-at=2026-10-20T09:00:00+00:00",
        "--score=ciwa-ar=4",
    )
    assert reassessed["events"][0]["data"]["assessment"]["indicated_level"] == "2.1"
    moved = cli.json("transition", pk, "--to=2.1", "--occurred-at=2026-10-21T09:00:00+00:00")
    data = moved["events"][0]["data"]
    assert (data["from_level"], data["placement"]["level"], data["direction"]) == (
        "3.5",
        "2.1",
        "step_down",
    )
    assert data["reassessment_event_id"] == reassessed["events"][0]["event_id"]
    cli("attend", pk, "--hours=3", "--date=2026-10-22", "--occurred-at=2026-10-22T12:00:00+00:00")
    cli(
        "discharge",
        pk,
        "--reason=dropped_out",
        "--disposition=aadvice",
        "--occurred-at=2026-10-25T09:00:00+00:00",
    )
    readmitted = cli.json(
        "readmit",
        pk,
        "--level=3.7-WM",
        "--site=site-b",
        "--ratings=3,0,0,1,2,1",
        "--occurred-at=2026-11-01T09:00:00+00:00",
    )
    assert readmitted["events"][0]["data"]["episode_number"] == 2
    mistaken = cli.json(
        "reassess", pk, "--ratings=0,0,0,0,0,0", "--occurred-at=2026-11-02T09:00:00+00:00"
    )
    mistaken_id = mistaken["events"][0]["event_id"]
    cli("void", pk, mistaken_id, "--reason=wrong_patient")

    history = cli("history", pk).stdout
    assert f"patient {pk}: 3.7-WM at site-b" in history
    assert "step-down 3.5 -> 2.1" in history
    assert "VOID reassessed" in history
    timeline = cli.json("history", pk)
    assert [e["event_type"] for e in timeline] == [
        "PatientAdmitted",
        "ReassessmentRecorded",
        "LevelTransitioned",
        "AttendanceRecorded",
        "PatientDischarged",
        "PatientReadmitted",
        "ReassessmentRecorded",
        "EventVoided",
    ]
    assert [e["stream_version"] for e in timeline] == list(range(1, 9))

    census = cli.json("census")
    assert census["total"] == 1
    assert census["levels"]["3.7-WM"] == 1
    assert sum(census["levels"].values()) == 1
    assert set(census) >= {"as_of", "levels", "total"}

    exported = cli.export()
    assert [e["position"] for e in exported] == list(range(1, 9))
    for event in exported:
        assert set(event) >= ENVELOPE_FIELDS
        assert event["actor"] == {"id": "cm-test", "role": "case_manager"}
        assert "Synthetic" not in json.dumps(event)
    assert [
        e["position"]
        for e in json.loads(
            "[" + ",".join(cli("log", "export", "--after=6").stdout.splitlines()) + "]"
        )
    ] == [7, 8]


def _refused(cli: Cli, code: int, *args: str) -> str:
    before = len(cli.export())
    result = cli(*args, code=code)
    assert len(cli.export()) == before, "a refused command must write nothing"
    return str(result.stderr)


def test_every_error_is_specific_and_writes_nothing(cli: Cli) -> None:
    pk = cli.admit()
    message = _refused(
        cli, 5, "transition", pk, "--to=2.1", "--occurred-at=2026-10-13T09:00:00+00:00"
    )
    assert "step-down to 2.1 needs a reassessment within 7 days; latest is 12 days old" in message
    assert "[rule reassessment.stale, policy asam-3@2026.1]" in message

    assert "level '9.9' is not in policy asam-3@2026.1" in _refused(
        cli, 3, "transition", pk, "--to=9.9"
    )
    assert "is not allowed by policy" in _refused(cli, 5, "transition", pk, "--to=aftercare")
    assert "rating for dimension 5 is '7'" in _refused(
        cli, 3, "reassess", pk, "--ratings=0,0,0,0,7,0"
    )
    assert "missing 6" in _refused(cli, 3, "reassess", pk, "--ratings=0,0,0,0,0")
    assert "no patient with key pk-aaaaaaaaaaaaaaaaaaaa" in _refused(
        cli, 4, "reassess", "pk-aaaaaaaaaaaaaaaaaaaa", "--ratings=0,0,0,0,0,0"
    )
    assert "expected version 3, actual 1" in _refused(
        cli, 6, "reassess", pk, "--ratings=0,0,0,0,0,0", "--expected-version=3"
    )
    assert "occurred_at" in _refused(
        cli, 3, "reassess", pk, "--ratings=0,0,0,0,0,0", "--occurred-at=yesterday"
    )
    assert "timezone" in _refused(
        cli, 3, "reassess", pk, "--ratings=0,0,0,0,0,0", "--occurred-at=2026-10-02T09:00:00"
    )
    assert "is in the future" in _refused(
        cli, 3, "reassess", pk, "--ratings=0,0,0,0,0,0", "--occurred-at=2999-01-01T00:00:00Z"
    )
    assert "is before admission" in _refused(
        cli, 3, "reassess", pk, "--ratings=0,0,0,0,0,0", "--occurred-at=2026-09-01T00:00:00Z"
    )
    assert "variance reason is required" in _refused(
        cli, 5, "admit", "--level=2.1", "--site=s", "--ratings=0,0,0,0,4,0", "--hours=10"
    )
    assert "reason death goes with disposition exp" in _refused(
        cli, 3, "discharge", pk, "--reason=death", "--disposition=home"
    )
    assert "reason" in _refused(cli, 3, "discharge", pk, "--reason=bored", "--disposition=home")
    first = cli.export()[0]["event_id"]
    assert "only the latest placement change" not in _refused(
        cli, 4, "void", pk, str(uuid.uuid4()), "--reason=duplicate"
    )
    cli.json("reassess", pk, "--ratings=0,0,1,0,4,0", "--occurred-at=2026-10-02T09:00:00Z")
    cli("transition", pk, "--to=3.5", "--site=site-b", "--occurred-at=2026-10-03T09:00:00Z")
    assert "only the latest placement change can be voided" in _refused(
        cli, 5, "void", pk, first, "--reason=entered_in_error"
    )


def test_idempotency_key_makes_a_retry_safe(cli: Cli) -> None:
    pk = cli.admit()
    args = [
        "reassess",
        pk,
        "--ratings=0,0,1,0,4,0",
        "--idempotency-key=req-42",
        "--occurred-at=2026-10-02T09:00:00Z",
    ]
    first = cli.json(*args)
    again = cli.json(*args)
    assert again["replayed"] is True
    assert again["events"][0]["event_id"] == first["events"][0]["event_id"]
    assert len(cli.export()) == 2
    assert "already used for a different command" in _refused(
        cli, 7, "reassess", pk, "--ratings=0,0,0,0,4,0", "--idempotency-key=req-42"
    )


def test_duplicate_mrn_is_refused(cli: Cli) -> None:
    cli.admit(
        "--given-name=Synthetic", "--family-name=One", "--birth-date=1980-02-02", "--mrn=SIM-0001"
    )
    message = _refused(
        cli,
        7,
        "admit",
        "--level=3.5",
        "--site=s",
        "--ratings=0,0,1,0,4,0",
        "--given-name=Synthetic",
        "--family-name=Two",
        "--birth-date=1981-02-02",
        "--mrn=SIM-0001",
    )
    assert "MRN is already registered" in message


def test_postgres_needs_an_explicit_migration(postgres_cli: Cli) -> None:
    result = postgres_cli("census", code=8)
    assert "run `continuum db upgrade`" in result.stderr
    assert "continuum db upgrade" in postgres_cli("db", "status").stdout
    assert f"-> {head_revision()}" in postgres_cli("db", "upgrade").stdout
    assert postgres_cli.json("census")["total"] == 0


def test_unreachable_database_says_what_to_check(tmp_path: Path) -> None:
    cli = Cli("postgresql://nobody@127.0.0.1:1/none")
    result = cli("census", code=9)
    assert "Check CONTINUUM_DATABASE_URL" in result.stderr
    assert "unsupported" not in result.stderr
    assert "is not supported" in Cli("mysql://x@localhost/db")("census", code=3).stderr


def test_simulated_cohort_is_realistic_and_its_census_adds_up(sqlite_cli: Cli) -> None:
    result = sqlite_cli("simulate", "--patients=300", "--days=200", "--seed=11")
    assert "discharge mix:" in result.stdout
    events = sqlite_cli.export()
    types = Counter(e["event_type"] for e in events)
    directions = Counter(
        e["data"]["direction"] for e in events if e["event_type"] == "LevelTransitioned"
    )
    reasons = Counter(e["data"]["reason"] for e in events if e["event_type"] == "PatientDischarged")
    assert types["PatientAdmitted"] == 300
    assert types["PatientReadmitted"] > 0
    assert directions["step_down"] > directions["step_up"] > 0
    assert reasons["dropped_out"] > 0
    assert all(e["actor"]["role"] == "case_manager" for e in events)
    # National mix (DOMAIN.md): completed 47%, dropped out 25%: the cohort stays near it.
    total = sum(reasons.values())
    assert abs(reasons["completed"] / total - 0.47) < 0.12
    assert abs(reasons["dropped_out"] / total - 0.25) < 0.08
    assert "reassessment.stale" in result.stdout  # missed reassessments refused, then fixed
    # The census equals entries minus exits, counted independently from the exported log.
    active = types["PatientAdmitted"] + types["PatientReadmitted"] - types["PatientDischarged"]
    census = sqlite_cli.json("census")
    assert census["total"] == active == sum(census["levels"].values())
    # Same seed, same journeys.
    again = Cli(sqlite_cli.env["CONTINUUM_DATABASE_URL"].replace("cli.sqlite3", "again.sqlite3"))
    again("simulate", "--patients=300", "--days=200", "--seed=11")
    assert again.json("census")["levels"] == census["levels"]


def test_console_script_runs_the_quick_start(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "continuum"
    env = {**os.environ, "CONTINUUM_DATABASE_URL": f"sqlite:///{tmp_path / 'q.sqlite3'}"}
    done = subprocess.run(
        [str(exe), "simulate", "--patients=20", "--days=60", "--seed=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Census as of" in done.stdout and "total" in done.stdout
