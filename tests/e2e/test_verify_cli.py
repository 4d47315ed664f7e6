"""`continuum seal` and `continuum verify --no-topic` end to end, on SQLite and PostgreSQL:
exit codes, output, and a log tampered with behind the service's back. (The topic check
through the CLI is in tests/integration/test_verify_topic.py, which needs a broker.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from typer.testing import CliRunner

from continuum.adapters.sql.database import create_database_engine
from continuum.application.verify import Finding
from continuum.entrypoints import verify_cli
from tests.e2e.test_cli import Cli as BaseCli

runner = CliRunner()
HEAD = re.compile(r"head (\d+):([0-9a-f]{64})")


class Cli(BaseCli):
    """The e2e CLI runner, with the engine of its database for tampering behind its back."""

    def __init__(self, database_url: str, engine: Engine) -> None:
        super().__init__(database_url)
        self.env.pop("CONTINUUM_ACTOR_ID", None)
        self.engine = engine

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self(*args, "--format", "json", code=code).stdout)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'verify.sqlite3'}"
        engine = create_database_engine(url)
        yield Cli(url, engine)
        engine.dispose()
        return
    pg_url: str = request.getfixturevalue("pg_url")
    schema = f"cli_{uuid.uuid4().hex[:10]}"
    admin = create_database_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_url else "?"
    engine = create_database_engine(pg_url, schema=schema)
    cli = Cli(f"{pg_url}{sep}options=-csearch_path%3D{schema}", engine)
    cli("db", "upgrade")
    yield cli
    engine.dispose()
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def simulated(cli: Cli) -> int:
    cli("simulate", "--patients=8", "--days=40", "--seed=4")
    with cli.engine.connect() as conn:
        return int(conn.scalar(text("SELECT max(position) FROM event_log")) or 0)


def test_seal_and_verify_exit_codes_and_output(cli: Cli) -> None:
    head = simulated(cli)
    unsealed = cli("verify", "--no-topic")
    assert "WARNING unsealed      position 1 " in unsealed.stdout
    assert f"{head} event(s) from position 1 to {head} are not sealed yet" in unsealed.stdout
    assert "verify: OK" in unsealed.stdout

    sealed = cli("seal")
    match = HEAD.search(sealed.stdout)
    assert match and int(match[1]) == head
    assert sealed.stdout.startswith(f"sealed {head} events;")
    anchor = f"{match[1]}:{match[2]}"
    again = cli.json("seal")
    assert again == {
        "sealed": 0,
        "head": anchor,
        "head_position": head,
        "head_hash": match[2],
    }

    report = cli.json("verify", "--no-topic", "--expect-head", anchor)
    assert report["ok"] is True and report["exit_code"] == 0
    assert report["findings"] == [] and report["topic"] is None
    assert report["chain"]["head"] == anchor and report["chain"]["sealed"] == head
    cli("verify", "--no-topic", "--expect-head", match[2])

    wrong = cli("verify", "--no-topic", "--expect-head", f"{head}:{'0' * 64}", code=11)
    assert "head_mismatch" in wrong.stdout and "verify: FAILED (1 finding(s))" in wrong.stdout
    malformed = cli("verify", "--no-topic", "--expect-head", "nonsense", code=3)
    assert "expected head must be HASH or POSITION:HASH" in malformed.stderr


def test_a_tampered_event_fails_verify_with_its_position_and_id(cli: Cli) -> None:
    simulated(cli)
    cli("seal")
    with cli.engine.begin() as conn:
        if cli.engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            conn.execute(text("DROP TRIGGER events_no_update"))
        row = conn.execute(
            text(
                "SELECT e.row_id, e.event_id FROM event_log l JOIN events e "
                "ON e.row_id = l.row_id WHERE l.position = 6"
            )
        ).one()
        conn.execute(
            text("UPDATE events SET actor_id = 'someone-else' WHERE row_id = :r"),
            {"r": row.row_id},
        )
    failed = cli("verify", "--no-topic", code=10)
    assert f"body_mismatch position 6 event {row.event_id}" in failed.stdout
    report = cli.json("verify", "--no-topic", code=10)
    assert [(f["kind"], f["position"], f["event_id"]) for f in report["findings"]] == [
        ("body_mismatch", 6, row.event_id)
    ]
    assert report["ok"] is False and report["exit_code"] == 10


def test_extra_checks_run_and_fail_with_their_own_code(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook for (2), rebuilt versus live projection: a registered check's findings."""
    simulated(cli)
    cli("seal")
    seen: list[int] = []

    def projection_differs(application: Any) -> list[Finding]:
        seen.append(application.store.head_position())
        return [Finding("projection", None, None, "census differs at level 3.5: 4 live, 5 rebuilt")]

    monkeypatch.setattr(verify_cli, "EXTRA_CHECKS", [projection_differs])
    result = cli("verify", "--no-topic", code=14)
    assert seen and "check projection_differs: 1 finding(s)" in result.stdout
    assert "census differs at level 3.5" in result.stdout


def test_console_script_reports_progress_on_stderr(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "continuum"
    env = {**os.environ, "CONTINUUM_DATABASE_URL": f"sqlite:///{tmp_path / 's.sqlite3'}"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(exe), *args], env=env, capture_output=True, text=True, timeout=300, check=False
        )

    assert run("simulate", "--patients=5", "--days=30", "--seed=1").returncode == 0
    assert run("seal", "--batch", "10").returncode == 0
    done = run("verify", "--no-topic")
    assert done.returncode == 0, done.stderr
    assert re.search(r"chain: checked (\d+)/\1 positions", done.stderr), done.stderr
    assert "verify: OK" in done.stdout


def test_seal_follow_keeps_sealing_until_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    exe = Path(sys.executable).parent / "continuum"
    url = f"sqlite:///{tmp_path / 'f.sqlite3'}"
    env = {**os.environ, "CONTINUUM_DATABASE_URL": url, "CONTINUUM_RELAY_POLL_INTERVAL_MS": "100"}
    cli = Cli(url, create_database_engine(url))
    try:
        first = simulated(cli)
        follower = subprocess.Popen(
            [str(exe), "seal", "--follow"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def sealed_to() -> int:
            with cli.engine.connect() as conn:
                return int(conn.scalar(text("SELECT max(position) FROM log_hashes")) or 0)

        def wait_until(condition: Any) -> None:
            deadline = time.monotonic() + 60
            while not condition():
                assert follower.poll() is None, follower.communicate()
                assert time.monotonic() < deadline, "timed out"
                time.sleep(0.1)

        try:
            wait_until(lambda: sealed_to() == first)
            cli("simulate", "--patients=2", "--days=20", "--seed=5")
            with cli.engine.connect() as conn:
                head = int(conn.scalar(text("SELECT max(position) FROM event_log")) or 0)
            assert head > first
            wait_until(lambda: sealed_to() == head)
            follower.send_signal(signal.SIGTERM)
            out, err = follower.communicate(timeout=60)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.communicate()
        assert follower.returncode == 0, err
        assert out.startswith(f"sealed {head} events; head {head}:"), out
        assert "following" in err
        cli("verify", "--no-topic")
    finally:
        cli.engine.dispose()
