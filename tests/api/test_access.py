"""Who may do what over HTTP: the role x endpoint matrix, site scoping, refused tokens, and the
access log that records every read of patient-level data."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from tests.api.conftest import Api, admit_body, assessment, days_ago

ROLES = ["case_manager", "clinician", "auditor", "integration", "admin"]


@dataclass(frozen=True)
class Call:
    method: str
    path: str  # "{key}" is a fresh patient at site-a, admitted 20 days ago
    body: Callable[[], dict[str, Any] | None]
    #: The roles that get a 2xx: the specification this test holds the service to.
    allowed: frozenset[str]


def _none() -> None:
    return None


ALL = frozenset(ROLES)
PATIENT_READERS = frozenset({"case_manager", "clinician", "auditor"})
CLINICAL_WRITERS = frozenset({"clinician", "integration"})

MATRIX = [
    Call("POST", "/v1/patients", admit_body, CLINICAL_WRITERS),
    Call("GET", "/v1/patients/{key}", _none, PATIENT_READERS),
    Call("GET", "/v1/patients/{key}/timeline", _none, PATIENT_READERS),
    Call("GET", "/v1/patients/{key}/fhir", _none, PATIENT_READERS),
    Call("GET", "/v1/patients", _none, PATIENT_READERS),
    Call(
        "POST",
        "/v1/patients/{key}/reassessments",
        lambda: {"occurred_at": days_ago(1), "assessment": assessment("000020", hours=12)},
        frozenset({"case_manager", "clinician", "integration"}),
    ),
    Call(
        "POST",
        "/v1/patients/{key}/attendance",
        lambda: {"service_date": days_ago(1)[:10], "hours": 3},
        CLINICAL_WRITERS,
    ),
    Call(
        "POST",
        "/v1/patients/{key}/discharges",
        lambda: {"reason": "completed", "disposition": "home", "occurred_at": days_ago(1)},
        CLINICAL_WRITERS,
    ),
    Call("GET", "/v1/census", _none, frozenset(ALL - {"integration"})),
    Call("GET", "/v1/census/daily?days=7", _none, frozenset(ALL - {"integration"})),
    Call("GET", "/v1/outcomes", _none, frozenset(ALL - {"integration"})),
    Call("GET", "/v1/audit-trail", _none, PATIENT_READERS),
    Call(
        "POST",
        "/v1/patients/{key}/consents",
        lambda: {
            "consent_id": "c-1",
            "recipient_org": "hie-north",
            "purposes": ["treatment"],
            "document_ref": "form-1",
        },
        frozenset({"clinician", "admin"}),
    ),
    Call("GET", "/v1/patients/{key}/consents", _none, PATIENT_READERS | {"admin"}),
    Call("GET", "/v1/disclosures", _none, frozenset({"auditor"})),
    Call("GET", "/v1/log/export", _none, frozenset({"auditor"})),
    Call("GET", "/v1/access-log", _none, frozenset({"auditor"})),
]


def _fresh_patient(api: Api) -> str:
    response = api.client.post(
        "/v1/patients", json=admit_body(days=20), headers=api.auth("clinician")
    )
    assert response.status_code == 201, response.text
    return str(response.json()["patient_key"])


@pytest.mark.parametrize("call", MATRIX, ids=lambda c: f"{c.method} {c.path}")
def test_role_endpoint_matrix(sqlite_api: Api, call: Call) -> None:
    api = sqlite_api
    for role in ROLES:
        key = _fresh_patient(api)
        path = call.path.format(key=key)
        body = call.body()
        response = api.client.request(
            call.method, path, json=body, headers=api.auth(role, ("site-a",))
        )
        if role in call.allowed:
            assert 200 <= response.status_code < 300, (role, response.status_code, response.text)
        else:
            assert response.status_code == 403, (role, response.status_code, response.text)
            assert response.json()["rule"] == "access.role"


@pytest.mark.parametrize("role", ROLES)
def test_transition_allowed_roles(sqlite_api: Api, role: str) -> None:
    api = sqlite_api
    key = _fresh_patient(api)
    api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"occurred_at": days_ago(1), "assessment": assessment("000020", hours=12)},
        headers=api.auth("clinician"),
    ).raise_for_status()
    response = api.client.post(
        f"/v1/patients/{key}/transitions", json={"to_level": "2.1"}, headers=api.auth(role)
    )
    expected = 201 if role in {"case_manager", "clinician", "integration"} else 403
    assert response.status_code == expected, (role, response.text)


def test_site_scoping(api: Api) -> None:
    key = _fresh_patient(api)  # at site-a
    other = api.auth("case_manager", ("site-b",))
    read = api.client.get(f"/v1/patients/{key}", headers=other)
    assert (read.status_code, read.json()["rule"]) == (403, "access.site")
    write = api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"occurred_at": days_ago(1), "assessment": assessment("000020")},
        headers=other,
    )
    assert (write.status_code, write.json()["rule"]) == (403, "access.site")
    admit_elsewhere = api.client.post(
        "/v1/patients", json=admit_body(site="site-a"), headers=api.auth("clinician", ("site-b",))
    )
    assert admit_elsewhere.status_code == 403
    api.project()
    listing = api.client.get("/v1/patients", headers=other).json()
    assert listing["patients"] == []
    mine = api.client.get("/v1/patients", headers=api.auth("case_manager", ("site-a",))).json()
    assert [p["patient_key"] for p in mine["patients"]] == [key]


def test_refused_tokens(api: Api) -> None:
    key = _fresh_patient(api)
    path = f"/v1/patients/{key}"
    good = api.token("auditor")
    header, _, signature = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    forged = json.dumps({**claims, "role": "admin"}, separators=(",", ":")).encode()
    forged_claims = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    cases = {
        "missing": None,
        "garbage": "not-a-jwt",
        "tampered": f"{header}.{forged_claims}.{signature}",
        "unsigned": jwt.encode({**claims}, key=None, algorithm="none"),
        "expired": api.issuer.issue(
            subject="user-x", role="auditor", sites=[], organization=None, ttl_seconds=-3600
        ),
        "wrong audience": jwt.encode(
            {**claims, "aud": "someone-else"},
            api.issuer.private_key,
            algorithm="RS256",
            headers={"kid": api.issuer.kid},
        ),
    }
    for name, token in cases.items():
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        response = api.client.get(path, headers=headers)
        assert response.status_code == 401, (name, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["WWW-Authenticate"].startswith("Bearer"), name
        assert response.json()["rule"].startswith("access.token"), (name, response.json())
        assert (token or "") not in response.text or token is None
    assert api.client.get(path, headers={"Authorization": f"Bearer {good}"}).status_code == 200


def test_every_read_is_in_the_access_log_with_its_purpose(api: Api) -> None:
    key = _fresh_patient(api)
    before = {e.id for e in api.ctx.access_log.query(limit=1000)}
    api.client.get(f"/v1/patients/{key}", headers=api.auth("clinician")).raise_for_status()
    api.client.get(
        f"/v1/patients/{key}/timeline",
        headers=api.auth("auditor", **{"X-Purpose-Of-Use": "HPAYMT"}),
    ).raise_for_status()
    denied = api.client.get(f"/v1/patients/{key}", headers=api.auth("case_manager", ("site-b",)))
    assert denied.status_code == 403
    bad_purpose = api.client.get(
        f"/v1/patients/{key}", headers=api.auth("clinician", **{"X-Purpose-Of-Use": "GOSSIP"})
    )
    assert bad_purpose.status_code == 422
    assert bad_purpose.json()["field"] == "header.x-purpose-of-use"
    new = [e for e in api.ctx.access_log.query(limit=1000) if e.id not in before]
    seen = [(e.subject, e.role, e.action, e.purpose, e.outcome, e.patient_key) for e in new]
    assert seen == [
        ("user-clinician", "clinician", "patient.read", "TREAT", "allowed", key),
        ("user-auditor", "auditor", "patient.timeline", "HPAYMT", "allowed", key),
        ("user-case_manager", "case_manager", "patient.read", "CAREMGT", "denied", key),
    ]
    assert all(e.channel == "http" and e.request_id for e in new)

    page = api.client.get(
        "/v1/access-log", params={"patient_key": key}, headers=api.auth("auditor")
    )
    assert page.status_code == 200
    assert [e["action"] for e in page.json()["entries"]] == [
        "patient.read",
        "patient.timeline",
        "patient.read",
    ]


def test_the_access_log_cannot_be_changed_or_deleted(api: Api) -> None:
    _fresh_patient(api)
    api.client.get("/v1/patients", headers=api.auth("auditor")).raise_for_status()
    for statement in ("UPDATE access_log SET subject = 'nobody'", "DELETE FROM access_log"):
        with pytest.raises(DBAPIError, match=r"append-only|refuse"), api.engine.begin() as conn:
            conn.execute(text(statement))
    assert [e.subject for e in api.ctx.access_log.query()] == ["user-auditor"]
