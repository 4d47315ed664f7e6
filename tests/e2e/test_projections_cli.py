"""The read-model commands end to end: census (now, as of, in care at, daily, occupancy),
audit trail (csv, json, html), metrics, project and replay, and their input errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.e2e.test_cli import Cli


@pytest.fixture
def cohort_cli(tmp_path: Path) -> Cli:
    cli = Cli(f"sqlite:///{tmp_path / 'cohort.sqlite3'}")
    cli("simulate", "--patients", "40", "--days", "90", "--seed", "4")
    return cli


def test_census_json_as_of_and_in_care_at(cohort_cli: Cli) -> None:
    now = cohort_cli.json("census")
    assert set(now) >= {"as_of", "levels", "total", "sites", "age_groups", "occupancy"}
    assert now["total"] == sum(now["levels"].values()) > 0
    assert sum(sum(v.values()) for v in now["sites"].values()) == now["total"]
    # Everything was recorded today: the log said nothing a year ago ...
    assert cohort_cli.json("census", "--as-of", "2025-01-01")["total"] == 0
    # ... though in clinical time the simulated patients were in care then.
    clinical = cohort_cli.json("census", "--as-of", now["as_of"][:10], "--clinical")
    assert clinical["total"] > 0
    future = cohort_cli.json("census", "--as-of", "2999-01-01")
    assert future["levels"] == now["levels"]


def test_daily_census_and_occupancy(cohort_cli: Cli, tmp_path: Path) -> None:
    history = cohort_cli.json("census", "--daily", "--days", "30")
    assert len(history["days"]) == 30
    assert all(day["total"] == sum(day["levels"].values()) for day in history["days"])
    capacity = tmp_path / "capacity.toml"
    capacity.write_text('[sites.site-north]\n"1" = 1\n"2.1" = 50\n', encoding="utf-8")
    cohort_cli.env["CONTINUUM_CAPACITY_FILE"] = str(capacity)
    census = cohort_cli.json("census")
    rows = {(r["site"], r["level"]): r for r in census["occupancy"]}
    north = census["sites"].get("site-north", {})
    assert rows[("site-north", "1")]["patients"] == north.get("1", 0)
    assert rows[("site-north", "2.1")]["capacity"] == 50
    assert rows[("site-north", "1")]["over_capacity"] == (north.get("1", 0) > 1)
    text = cohort_cli("census").stdout
    assert "Occupancy against capacity" in text


def test_audit_trail_formats_agree(cohort_cli: Cli, tmp_path: Path) -> None:
    rows = json.loads(cohort_cli("audit", "trail", "--format", "json").stdout)
    assert rows
    table = list(csv.DictReader(io.StringIO(cohort_cli("audit", "trail").stdout)))
    assert [r["event_id"] for r in table] == [r["event_id"] for r in rows]
    assert {r["direction"] for r in rows} <= {"step_down", "step_up", "lateral", "readmission"}
    flagged = json.loads(cohort_cli("audit", "trail", "--flagged", "--format", "json").stdout)
    assert flagged
    assert all(any(v for k, v in r.items() if k.startswith("flag_")) for r in flagged)
    out = tmp_path / "trail.html"
    cohort_cli("audit", "trail", "--format", "html", "--output", str(out))
    page = out.read_text(encoding="utf-8")
    assert page.count("<tr") == len(rows) + 1
    assert "<script" not in page
    first = rows[0]["occurred_at"][:10]
    some = json.loads(
        cohort_cli("audit", "trail", "--from", first, "--to", first, "--format", "json").stdout
    )
    assert some
    assert all(r["occurred_at"][:10] == first for r in some)


def test_metrics_json(cohort_cli: Cli) -> None:
    metrics = cohort_cli.json("metrics")
    assert metrics["discharges"] > 0
    assert 0 <= metrics["completion_rate"] <= 1
    for level, stat in metrics["length_of_stay_days"]["by_level"].items():
        assert stat["n"] == metrics["exits_by_level"][level]["exits"]
        assert stat["median"] >= 1
    assert "Stays ended in the range" in cohort_cli("metrics").stdout


def test_project_status_and_replay_into_another_database(cohort_cli: Cli, tmp_path: Path) -> None:
    assert json.loads(cohort_cli("project", "--status").stdout)["lag"] == 0  # simulate caught up
    cohort_cli.admit()
    assert json.loads(cohort_cli("project", "--status").stdout)["lag"] == 1
    assert "projected 1 events" in cohort_cli("project").stdout
    assert json.loads(cohort_cli("project", "--status").stdout) == {"source": "store", "lag": 0}
    target = f"sqlite:///{tmp_path / 'replayed.sqlite3'}"
    result = cohort_cli("replay", "--into", target)
    assert "replayed" in result.stdout
    live = cohort_cli.json("census", "--no-catch-up")
    other = Cli(cohort_cli.env["CONTINUUM_DATABASE_URL"])
    other.env["CONTINUUM_READ_MODEL_URL"] = target
    assert other.json("census", "--no-catch-up")["levels"] == live["levels"]
    assert other.json("metrics", "--no-catch-up") == cohort_cli.json("metrics", "--no-catch-up")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["census", "--as-of", "last tuesday"], "as_of"),
        (["audit", "trail", "--from", "2026-13-01"], "from"),
        (["metrics", "--to", "soon"], "to"),
    ],
)
def test_bad_moments_are_refused_with_the_field(
    cohort_cli: Cli, args: list[str], field: str
) -> None:
    result = cohort_cli(*args, code=3)
    assert f'"field": "{field}"' in result.stderr


def test_bad_capacity_file_is_refused(cohort_cli: Cli, tmp_path: Path) -> None:
    capacity = tmp_path / "capacity.toml"
    capacity.write_text('[sites.north]\n"1" = "many"\n', encoding="utf-8")
    cohort_cli.env["CONTINUUM_CAPACITY_FILE"] = str(capacity)
    result = cohort_cli("census", code=3)
    assert "sites.north.1" in result.stderr
    assert "CONTINUUM_CAPACITY_FILE" in result.stderr
    cohort_cli.env["CONTINUUM_CAPACITY_FILE"] = str(tmp_path / "missing.toml")
    assert "does not exist" in cohort_cli("census", code=3).stderr


def test_a_read_model_fed_by_kafka_is_not_caught_up_from_the_store(
    cohort_cli: Cli, tmp_path: Path
) -> None:
    from continuum.adapters.sql.database import create_database_engine
    from continuum_projections.readmodel import ReadModel

    target = f"sqlite:///{tmp_path / 'kafka-fed.sqlite3'}"
    model = ReadModel(create_database_engine(target))
    model.create()
    model.claim("kafka:continuum.events.v1")
    cohort_cli.env["CONTINUUM_READ_MODEL_URL"] = target
    result = cohort_cli("census", "--format", "json")
    assert "not catching up from the store" in result.stderr
    assert json.loads(result.stdout)["total"] == 0
    result = cohort_cli("project", code=8)
    assert "fed by kafka:continuum.events.v1" in result.stderr


def test_verify_rebuilds_the_projection_and_names_differences(cohort_cli: Cli) -> None:
    from sqlalchemy import text

    from continuum.adapters.sql.database import create_database_engine

    cohort_cli("seal")
    result = cohort_cli("verify", "--no-topic", "--format", "json")
    report = json.loads(result.stdout)
    assert report["extra_checks"] == {"projection_check": 0}
    engine = create_database_engine(cohort_cli.env["CONTINUUM_DATABASE_URL"])
    with engine.begin() as conn:
        stay = conn.execute(text("SELECT stay_id FROM rm_stays LIMIT 1")).scalar()
        conn.execute(text("UPDATE rm_stays SET level = '2.5' WHERE stay_id = :s"), {"s": stay})
    engine.dispose()
    result = cohort_cli("verify", "--no-topic", code=14)
    assert f"rm_stays {stay}: level" in result.stdout + result.stderr


def test_replay_with_two_workers_builds_what_one_builds(cohort_cli: Cli, tmp_path: Path) -> None:
    from continuum.adapters.sql.database import create_database_engine
    from continuum_projections.compare import diff_read_models
    from continuum_projections.readmodel import ReadModel

    one = f"sqlite:///{tmp_path / 'one.sqlite3'}"
    two = f"sqlite:///{tmp_path / 'two.sqlite3'}"
    cohort_cli("replay", "--into", one)
    result = cohort_cli("replay", "--into", two, "--workers", "2")
    assert "replayed" in result.stdout
    assert "(2 workers)" in result.stderr  # the progress bar
    expected, actual = create_database_engine(one), create_database_engine(two)
    try:
        assert diff_read_models(expected, actual) == []
        head = ReadModel(expected).checkpoint("store")
        assert head > 0
        assert ReadModel(actual).checkpoints_like("store") == {"store": head, "store:state": head}
        assert ReadModel(actual).source() == "store"
    finally:
        expected.dispose()
        actual.dispose()


def test_replay_workers_split_only_the_store(cohort_cli: Cli, tmp_path: Path) -> None:
    target = f"sqlite:///{tmp_path / 'no.sqlite3'}"
    result = cohort_cli("replay", "--into", target, "--source", "kafka", "--workers", "2", code=3)
    assert '"field": "workers"' in result.stderr
    assert "replay.workers_need_store" in result.stderr
    assert "continuum project --source kafka" in result.stderr
