"""schemathesis against the OpenAPI document, on PostgreSQL: for every operation, generated
requests (schema-valid ones and invalid ones) never get a 5xx, and every response matches its
documented status, content type and schema; invalid requests are refused with a 4xx.

schemathesis's pytest plugin does not run under pytest 9, so each operation's Hypothesis
strategy is driven here directly (the same cases and checks the plugin would run)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from continuum.domain.policy import PolicyRegistry
from tests.api.conftest import Api, _api, admit_body
from tests.support import fresh_pg_schema

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 25
WITHOUT_PARAMETERS = {"GET /health/live", "GET /health/ready"}


@pytest.fixture(scope="module")
def fuzzed(
    pg_url: str, tmp_path_factory: pytest.TempPathFactory, policies: PolicyRegistry
) -> Iterator[Api]:
    with fresh_pg_schema(pg_url, prefix="fuzz") as engine:
        api = _api(engine, pg_url, tmp_path_factory.mktemp("fuzz"), policies)
        # One real patient, so that generated requests can also reach deeper paths.
        api.client.post(
            "/v1/patients", json=admit_body(), headers=api.auth("clinician")
        ).raise_for_status()
        api.project()
        yield api


def _operations(api: Api) -> dict[str, Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


OPERATIONS = [
    "POST /v1/patients",
    "GET /v1/patients",
    "GET /v1/patients/{patient_key}",
    "GET /v1/patients/{patient_key}/timeline",
    "GET /v1/patients/{patient_key}/fhir",
    "POST /v1/patients/{patient_key}/reassessments",
    "POST /v1/patients/{patient_key}/transitions",
    "POST /v1/patients/{patient_key}/attendance",
    "POST /v1/patients/{patient_key}/discharges",
    "POST /v1/patients/{patient_key}/readmissions",
    "POST /v1/patients/{patient_key}/voids",
    "POST /v1/patients/{patient_key}/consents",
    "POST /v1/patients/{patient_key}/consent-revocations",
    "GET /v1/patients/{patient_key}/consents",
    "GET /v1/disclosures",
    "GET /v1/census",
    "GET /v1/census/daily",
    "GET /v1/outcomes",
    "GET /v1/audit-trail",
    "GET /v1/log/export",
    "GET /v1/access-log",
    "GET /health/live",
    "GET /health/ready",
]


def test_every_operation_is_covered(fuzzed: Api) -> None:
    assert sorted(_operations(fuzzed)) == sorted(OPERATIONS)


@pytest.mark.parametrize("name", OPERATIONS)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_and_every_response_matches_the_document(
    fuzzed: Api, name: str, mode: GenerationMode
) -> None:
    operation = _operations(fuzzed)[name]
    role = (
        "auditor" if "/log" in name or "/access-log" in name or "disclos" in name else "clinician"
    )
    headers = {"Authorization": "Bearer " + fuzzed.token(role, ("site-a", "site-b"))}
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    if mode is GenerationMode.NEGATIVE and name in WITHOUT_PARAMETERS:
        pytest.skip(f"{name} takes no input: there is nothing to make invalid")
    # The token is given, not generated: an invalid Authorization header is a 401 case of its
    # own (tests/api/test_access.py), and a generated one would be replaced here anyway.
    strategy = operation.as_strategy(generation_mode=mode, headers=headers)

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case) -> None:
        statuses.append(case.call_and_validate(checks=checks).status_code)

    statuses: list[int] = []
    run()
    assert statuses and 401 not in statuses  # every case carried the valid token
