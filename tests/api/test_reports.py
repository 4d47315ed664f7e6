"""Census, audit trail, outcomes, the log export and health over HTTP, checked against the
read models and the store they come from."""

from __future__ import annotations

import csv
import io
import json

from continuum_events import parse_event_json
from continuum_projections import reports
from tests.api.conftest import Api, admit_body, assessment, days_ago


def _cohort(api: Api) -> list[str]:
    keys = []
    for i, (site, level) in enumerate([("site-a", "3.5"), ("site-a", "3.7"), ("site-b", "3.5")]):
        variance = {"variance_reason": "no_slot"} if level != "3.5" else {}
        response = api.client.post(
            "/v1/patients",
            json=admit_body(site=site, level=level, days=20 + i, **variance),
            headers=api.auth("clinician", (site,)),
        )
        assert response.status_code == 201, response.text
        keys.append(response.json()["patient_key"])
    # A stale step-down with a variance: flagged in the audit trail.
    api.client.post(
        f"/v1/patients/{keys[0]}/reassessments",
        json={"occurred_at": days_ago(6), "assessment": assessment("000020", hours=12)},
        headers=api.auth("clinician"),
    ).raise_for_status()
    api.client.post(
        f"/v1/patients/{keys[0]}/transitions",
        json={"to_level": "2.1", "occurred_at": days_ago(5)},
        headers=api.auth("clinician"),
    ).raise_for_status()
    return keys


def test_census_equals_the_read_model(api: Api) -> None:
    _cohort(api)
    api.project()
    response = api.client.get("/v1/census", headers=api.auth("admin"))
    assert response.status_code == 200
    body = response.json()
    with api.ctx.read_engine.connect() as conn:
        expected = reports.current_census(conn, level_order=api.ctx.level_order).to_json_dict()
    assert body["levels"] == expected["levels"]
    assert body["sites"] == {"site-a": {"2.1": 1, "3.7": 1}, "site-b": {"3.5": 1}}
    assert body["total"] == 3
    past = api.client.get(
        "/v1/census", params={"as_of": days_ago(10), "clinical": "true"}, headers=api.auth("admin")
    ).json()
    assert past["sites"] == {"site-a": {"3.5": 1, "3.7": 1}, "site-b": {"3.5": 1}}
    bad = api.client.get("/v1/census", params={"as_of": "last tuesday"}, headers=api.auth("admin"))
    assert (bad.status_code, bad.json()["field"]) == (422, "as_of")
    daily = api.client.get("/v1/census/daily", params={"days": 30}, headers=api.auth("auditor"))
    assert len(daily.json()["days"]) == 30
    assert daily.json()["days"][-1]["total"] == 3


def test_audit_trail_json_csv_and_site_filter(api: Api) -> None:
    keys = _cohort(api)
    api.project()
    rows = api.client.get("/v1/audit-trail", headers=api.auth("auditor")).json()["rows"]
    assert [(r["patient_key"], r["from_level"], r["to_level"]) for r in rows] == [
        (keys[0], "3.5", "2.1")
    ]
    as_csv = api.client.get(
        "/v1/audit-trail", params={"format": "csv"}, headers=api.auth("auditor")
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["patient_key"] for r in parsed] == [keys[0]]
    elsewhere = api.client.get("/v1/audit-trail", headers=api.auth("case_manager", ("site-b",)))
    assert elsewhere.json()["rows"] == []
    recorded = [e for e in api.ctx.access_log.query() if e.action == "audit_trail.read"]
    assert [(e.role, e.records) for e in recorded] == [
        ("auditor", 1),
        ("auditor", 1),
        ("case_manager", 0),
    ]


def test_log_export_streams_the_log_and_is_recorded(api: Api) -> None:
    _cohort(api)
    head = api.head()
    response = api.client.get("/v1/log/export", headers=api.auth("auditor"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = response.content.splitlines()
    assert len(lines) == head
    exported = [parse_event_json(line) for line in lines]
    assert [e.position for e in exported] == list(range(1, head + 1))
    assert [e.event_id for e in exported] == [
        e.event_id for e in api.ctx.app.store.read_all(0, head)
    ]
    partial = api.client.get(
        "/v1/log/export", params={"after": 2, "limit": 2}, headers=api.auth("auditor")
    )
    assert [json.loads(line)["position"] for line in partial.content.splitlines()] == [3, 4]
    recorded = [e for e in api.ctx.access_log.query() if e.action == "log.export"]
    assert [(e.subject, e.records) for e in recorded] == [
        ("user-auditor", head),
        ("user-auditor", 2),
    ]


def test_health(sqlite_api: Api) -> None:
    api = sqlite_api
    assert api.client.get("/health/live").json() == {"status": "ok"}
    ready = api.client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["projection_lag"] == 0
    _cohort(api)
    behind = api.client.get("/health/ready")
    limit = api.ctx.app.settings.api_max_projection_lag
    assert behind.json()["projection_lag"] == api.head()
    assert (behind.status_code == 503) is (api.head() > limit)
    api.ctx.app.settings.api_max_projection_lag = 0
    lagging = api.client.get("/health/ready")
    assert lagging.status_code == 503
    assert "continuum project --follow" in lagging.json()["problems"][0]
    api.project()
    ready = api.client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["projection_source"] == "store"


def test_readiness_of_read_models_fed_from_kafka_does_not_measure_them_against_the_store(
    sqlite_api: Api,
) -> None:
    api = sqlite_api
    api.ctx.read_model.claim("kafka:continuum.events")
    _cohort(api)
    api.ctx.app.settings.api_max_projection_lag = 0
    ready = api.client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["projection_source"] == "kafka:continuum.events"
    assert body["projection_lag"] is None
    assert body["head_position"] == api.head() > 0
