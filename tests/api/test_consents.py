"""Consents over HTTP: give, list, revoke, the refusals (each with its rule and nothing
written), site scoping, and the auditors' view of the disclosure record."""

from __future__ import annotations

import datetime as dt
from typing import Any

from continuum.application.disclosure import Disclosure
from tests.api.conftest import Api, admit_body

CONSENT = {
    "consent_id": "c-2026-01",
    "recipient_org": "hie-north",
    "purposes": ["payment", "treatment"],
    "document_ref": "form-88",
}


def _patient(api: Api) -> str:
    response = api.client.post(
        "/v1/patients", json=admit_body(days=20), headers=api.auth("clinician")
    )
    assert response.status_code == 201, response.text
    return str(response.json()["patient_key"])


def _consents(api: Api, key: str, role: str = "auditor") -> list[dict[str, Any]]:
    response = api.client.get(f"/v1/patients/{key}/consents", headers=api.auth(role))
    assert response.status_code == 200, response.text
    return list(response.json()["consents"])


def test_give_list_and_revoke(api: Api) -> None:
    key = _patient(api)
    given = api.client.post(
        f"/v1/patients/{key}/consents", json=CONSENT, headers=api.auth("clinician")
    )
    assert given.status_code == 201, given.text
    assert [e["event_type"] for e in given.json()["events"]] == ["ConsentGiven"]
    assert given.headers["ETag"] == '"2"'

    [consent] = _consents(api, key)
    assert consent["consent_id"] == "c-2026-01"
    assert consent["recipient_org"] == "hie-north"
    assert consent["purposes"] == ["treatment", "payment"]  # the order ConsentPurpose lists
    assert (consent["status"], consent["revoked_on"]) == ("active", None)

    revoked = api.client.post(
        f"/v1/patients/{key}/consent-revocations",
        json={"consent_id": "c-2026-01"},
        headers=api.auth("admin", **{"If-Match": '"2"'}),
    )
    assert revoked.status_code == 201, revoked.text
    [consent] = _consents(api, key, role="case_manager")
    assert consent["status"] == "revoked"
    assert consent["revoked_on"] == api.ctx.app.service.clock().date().isoformat()

    log = api.client.get(
        "/v1/access-log", params={"patient_key": key}, headers=api.auth("auditor")
    ).json()["entries"]
    reads = [(e["role"], e["records"]) for e in log if e["action"] == "patient.consents"]
    assert reads == [("auditor", 1), ("case_manager", 1)]


def test_refusals_name_the_rule_and_write_nothing(api: Api) -> None:
    key = _patient(api)
    api.client.post(
        f"/v1/patients/{key}/consents", json=CONSENT, headers=api.auth("clinician")
    ).raise_for_status()
    head = api.head()
    today = api.ctx.app.service.clock().date()
    now, later = str(today), str(today + dt.timedelta(days=3))
    earlier = str(today - dt.timedelta(days=1))
    cases: list[tuple[str, dict[str, Any], int, str, str]] = [
        ("consents", {**CONSENT, "consent_id": "c-2", "recipient_org": "HIE North"},
         422, "consent.org_malformed", "recipient_org"),
        ("consents", CONSENT, 409, "consent.id_used", "consent_id"),
        ("consents", {**CONSENT, "consent_id": "c-3", "given_on": later},
         422, "consent.given_in_future", "given_on"),
        ("consents", {**CONSENT, "consent_id": "c-4", "given_on": now, "expires_on": earlier},
         422, "consent.expires_before_given", "expires_on"),
        ("consent-revocations", {"consent_id": "c-unknown"}, 404, "consent.unknown", "consent_id"),
    ]  # fmt: skip
    for path, body, status, rule, field in cases:
        response = api.client.post(
            f"/v1/patients/{key}/{path}", json=body, headers=api.auth("clinician")
        )
        assert response.status_code == status, (rule, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert (problem["rule"], problem["field"]) == (rule, field), problem
    no_purpose = api.client.post(
        f"/v1/patients/{key}/consents",
        json={**CONSENT, "consent_id": "c-5", "purposes": []},
        headers=api.auth("clinician"),
    )
    assert no_purpose.status_code == 422
    assert no_purpose.json()["field"] == "body.purposes"
    assert api.head() == head  # nothing written by any refusal

    api.client.post(
        f"/v1/patients/{key}/consent-revocations",
        json={"consent_id": CONSENT["consent_id"]},
        headers=api.auth("clinician"),
    ).raise_for_status()
    again = api.client.post(
        f"/v1/patients/{key}/consent-revocations",
        json={"consent_id": CONSENT["consent_id"]},
        headers=api.auth("clinician"),
    )
    assert (again.status_code, again.json()["rule"]) == (409, "consent.already_revoked")


def test_consents_are_site_scoped_and_integration_never_reads_them(api: Api) -> None:
    key = _patient(api)  # at site-a
    elsewhere = api.auth("clinician", ("site-b",))
    give = api.client.post(f"/v1/patients/{key}/consents", json=CONSENT, headers=elsewhere)
    assert (give.status_code, give.json()["rule"]) == (403, "access.site")
    read = api.client.get(f"/v1/patients/{key}/consents", headers=elsewhere)
    assert (read.status_code, read.json()["rule"]) == (403, "access.site")
    denied = api.client.get(f"/v1/patients/{key}/consents", headers=api.auth("integration"))
    assert (denied.status_code, denied.json()["rule"]) == (403, "access.role")
    log = api.client.get(
        "/v1/access-log", params={"patient_key": key}, headers=api.auth("auditor")
    ).json()["entries"]
    assert [(e["action"], e["outcome"]) for e in log] == [("patient.consents", "denied")]


def test_disclosure_record_for_auditors(api: Api) -> None:
    key = _patient(api)
    other = _patient(api)
    at = dt.datetime(2026, 5, 1, 12, tzinfo=dt.UTC)
    north, payer = "continuum.disclosure.hie-north.v1", "continuum.disclosure.payer-x.v1"
    rows = [
        Disclosure("hie-north", key, "e-1", 3, "c-1", north, 0, 0, at),
        Disclosure("hie-north", key, "e-2", 5, "c-1", north, 0, 1, at),
        Disclosure("payer-x", other, "e-3", 6, "c-9", payer, 1, 0, at),
    ]
    api.ctx.disclosures.record(rows, checkpoint="disclosure:test", expected=0, position=6)

    page = api.client.get(
        "/v1/disclosures", params={"org": "hie-north", "limit": 1}, headers=api.auth("auditor")
    )
    assert page.status_code == 200, page.text
    first = page.json()
    assert [d["event_id"] for d in first["disclosures"]] == ["e-1"]
    rest = api.client.get(
        "/v1/disclosures",
        params={"org": "hie-north", "after_id": first["next_after_id"]},
        headers=api.auth("auditor"),
    ).json()
    assert [d["event_id"] for d in rest["disclosures"]] == ["e-2"]
    assert rest["next_after_id"] is None
    mine = api.client.get(
        "/v1/disclosures", params={"patient_key": other}, headers=api.auth("auditor")
    ).json()
    assert [(d["org"], d["consent_id"]) for d in mine["disclosures"]] == [("payer-x", "c-9")]

    bad = api.client.get("/v1/disclosures", params={"org": "Payer X"}, headers=api.auth("auditor"))
    assert (bad.status_code, bad.json()["rule"]) == (422, "consent.org_malformed")
    log = api.client.get("/v1/access-log", headers=api.auth("auditor")).json()["entries"]
    assert [e["records"] for e in log if e["action"] == "disclosures.read"] == [1, 1, 1]
