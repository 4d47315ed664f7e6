"""Oversized bodies, wrong content types and injection strings in every text field: a clear
4xx naming the problem, and nothing written."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.conftest import Api, admit_body, assessment

INJECTIONS = [
    "'; DROP TABLE events; --",
    "<script>alert(1)</script>",
    "${jndi:ldap://127.0.0.1/a}",
    "{{7*7}}",
    "../../etc/passwd",
    "a\u0000b",
    "Robert'); DELETE FROM access_log;--",
    "x" * 5000,
]


def _text_paths(body: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every string-valued field (and every key of a ratings/scores map) in a body."""
    if isinstance(body, dict):
        for key, value in body.items():
            if isinstance(value, str):
                yield (*prefix, key)
            else:
                yield from _text_paths(value, (*prefix, key))


def _set(body: dict[str, Any], path: tuple[Any, ...], value: str) -> dict[str, Any]:
    out = copy.deepcopy(body)
    target = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


FULL_ADMIT = admit_body(
    program="prog-1",
    authorization_ref="auth-77",
    variance_reason="patient_preference",
    identity={
        "given_name": "Ada",
        "family_name": "Quill",
        "birth_date": "1990-01-01",
        "mrn": "SIM-9",
    },
)
FULL_ADMIT["assessment"]["source_ref"] = "note-123"


def test_injection_strings_in_every_text_field_are_refused_without_a_write(sqlite_api: Api) -> None:
    api = sqlite_api
    paths = list(_text_paths(FULL_ADMIT))
    assert len(paths) >= 12  # level, site, program, age group, refs, assessment, identity...
    head = api.head()
    for path in paths:
        for attack in INJECTIONS:
            body = _set(FULL_ADMIT, path, attack)
            response = api.client.post("/v1/patients", json=body, headers=api.auth("clinician"))
            assert response.status_code == 422, (path, attack, response.status_code)
            problem = response.json()
            assert problem["errors"], path
            assert any(".".join(map(str, path)) in e["field"] for e in problem["errors"]), (
                path,
                problem["errors"],
            )
    # Keys of the ratings map are text too.
    for attack in INJECTIONS[:4]:
        body = copy.deepcopy(FULL_ADMIT)
        body["assessment"]["ratings"][attack] = "1"
        response = api.client.post("/v1/patients", json=body, headers=api.auth("clinician"))
        assert response.status_code == 422, attack
    assert api.head() == head
    # Query strings and path parameters too.
    for attack in INJECTIONS[:4]:
        bad = api.client.get(f"/v1/patients/{attack}", headers=api.auth("auditor"))
        assert bad.status_code in (404, 422), attack
        listing = api.client.get(
            "/v1/patients", params={"site": attack}, headers=api.auth("auditor")
        )
        assert listing.status_code in (200, 422), attack
        if listing.status_code == 200:
            assert listing.json()["patients"] == []


#: Every other command body, with every optional text field filled in.
OTHER_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("reassessments", {"occurred_at": "2026-01-02T00:00:00+00:00", "assessment": assessment()}),
    (
        "transitions",
        {
            "to_level": "2.1",
            "site": "site-a",
            "program": "prog-1",
            "variance_reason": "patient_preference",
            "authorization_ref": "auth-1",
        },
    ),
    ("attendance", {"service_date": "2026-01-02", "hours": 3}),
    ("discharges", {"reason": "completed", "disposition": "home"}),
    ("readmissions", {"level": "3.5", "site": "site-a", "assessment": assessment()}),
    ("voids", {"event_id": "9b2f4a52-4c8e-4b53-9b0e-3f2a1d5e6c7b", "reason": "entered_in_error"}),
    (
        "consents",
        {
            "consent_id": "c-1",
            "recipient_org": "hie-north",
            "purposes": ["treatment"],
            "document_ref": "form-1",
        },
    ),
    ("consent-revocations", {"consent_id": "c-1"}),
]


@pytest.mark.parametrize(("route", "template"), OTHER_BODIES, ids=[r for r, _ in OTHER_BODIES])
def test_injection_strings_in_every_command_body_are_refused_without_a_write(
    sqlite_api: Api, route: str, template: dict[str, Any]
) -> None:
    api = sqlite_api
    created = api.client.post("/v1/patients", json=admit_body(), headers=api.auth("clinician"))
    key = created.json()["patient_key"]
    head = api.head()
    paths = list(_text_paths(template))
    assert paths
    for path in paths:
        for attack in INJECTIONS:
            response = api.client.post(
                f"/v1/patients/{key}/{route}",
                json=_set(template, path, attack),
                headers=api.auth("clinician"),
            )
            assert response.status_code == 422, (route, path, attack, response.text[:300])
            problem = response.json()
            named = [e["field"] for e in problem.get("errors") or []] + [problem["field"]]
            assert any(path[-1] in str(field) for field in named), (path, problem)
    assert api.head() == head


def test_oversized_body_is_413_and_nothing_is_written(sqlite_api: Api) -> None:
    api = sqlite_api
    head = api.head()
    limit = api.ctx.app.settings.api_max_body_bytes
    body = admit_body()
    body["assessment"]["scores"] = {f"s{i}": float(i) for i in range(limit // 8)}
    raw = json.dumps(body).encode()
    assert len(raw) > limit
    response = api.client.post(
        "/v1/patients",
        content=raw,
        headers=api.auth("clinician", **{"Content-Type": "application/json"}),
    )
    assert response.status_code == 413
    assert response.json()["rule"] == "http.body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit still holds
        for i in range(0, len(raw), 4096):
            yield raw[i : i + 4096]

    streamed = api.client.post(
        "/v1/patients",
        content=chunks(),
        headers=api.auth("clinician", **{"Content-Type": "application/json"}),
    )
    assert streamed.status_code == 413
    assert api.head() == head


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/xml", None],
)
def test_wrong_content_type_is_415_and_nothing_is_written(
    sqlite_api: Api, content_type: str | None
) -> None:
    api = sqlite_api
    head = api.head()
    headers = api.auth("clinician")
    if content_type:
        headers["Content-Type"] = content_type
    response = api.client.post(
        "/v1/patients", content=json.dumps(admit_body()).encode(), headers=headers
    )
    assert response.status_code == 415, response.text
    assert response.json()["field"] == "Content-Type"
    assert api.head() == head


def test_malformed_json_is_422(sqlite_api: Api) -> None:
    api = sqlite_api
    response = api.client.post(
        "/v1/patients",
        content=b'{"level": "3.5", ',
        headers=api.auth("clinician", **{"Content-Type": "application/json"}),
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    unknown = api.client.post(
        "/v1/patients",
        json={**admit_body(), "assessment": {**assessment(), "free_text": "narrative"}},
        headers=api.auth("clinician"),
    )
    assert unknown.status_code == 422
    assert "body.assessment.free_text" in {e["field"] for e in unknown.json()["errors"]}
