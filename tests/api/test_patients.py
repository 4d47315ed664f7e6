"""Patients over HTTP: commands, reads, ETag / If-Match, Idempotency-Key, problem details."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Api, admit_body, assessment, days_ago

pytestmark = pytest.mark.filterwarnings("error")

IDENTITY = {"given_name": "Zenobia", "family_name": "Quillfeather", "birth_date": "1980-02-03"}


def admit(api: Api, role: str = "clinician", **body: Any) -> dict[str, Any]:
    response = api.client.post("/v1/patients", json=admit_body(**body), headers=api.auth(role))
    assert response.status_code == 201, response.text
    return dict(response.json())


def test_admit_then_read_state_timeline_and_etag(api: Api) -> None:
    created = admit(api, identity={**IDENTITY, "mrn": "SIM-0001"})
    key = created["patient_key"]
    assert created["version"] == 1
    assert [e["event_type"] for e in created["events"]] == ["PatientAdmitted"]

    state = api.client.get(f"/v1/patients/{key}", headers=api.auth("clinician"))
    assert state.status_code == 200
    assert state.headers["ETag"] == '"1"'
    body = state.json()
    assert (body["state"], body["site"], body["active"]) == ("3.5", "site-a", True)
    assert body["identity"]["family_name"] == "Quillfeather"
    assert body["latest_assessment"]["ratings"] == assessment()["ratings"]

    timeline = api.client.get(f"/v1/patients/{key}/timeline", headers=api.auth("auditor"))
    assert timeline.status_code == 200
    events = timeline.json()["events"]
    assert [e["event"]["event_type"] for e in events] == ["PatientAdmitted"]
    assert events[0]["event"]["actor"] == {"id": "user-clinician", "role": "clinician"}
    assert "Quillfeather" not in timeline.text  # identity never in events


def test_identity_is_shown_only_to_roles_that_need_it(api: Api) -> None:
    key = admit(api, identity=IDENTITY)["patient_key"]
    for role, shown in [("clinician", True), ("case_manager", True), ("auditor", False)]:
        response = api.client.get(f"/v1/patients/{key}", headers=api.auth(role))
        assert response.status_code == 200, (role, response.text)
        assert (response.json()["identity"] is not None) is shown, role
        assert ("Quillfeather" in response.text) is shown, role


def test_step_down_with_if_match_then_stale_etag_is_a_conflict(api: Api) -> None:
    key = admit(api, days=20)["patient_key"]
    reassessed = api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"occurred_at": days_ago(1), "assessment": assessment("000020", hours=12)},
        headers=api.auth("case_manager", **{"If-Match": '"1"'}),
    )
    assert reassessed.status_code == 201, reassessed.text
    assert reassessed.headers["ETag"] == '"2"'
    moved = api.client.post(
        f"/v1/patients/{key}/transitions",
        json={"to_level": "2.1"},
        headers=api.auth("case_manager", **{"If-Match": '"2"'}),
    )
    assert moved.status_code == 201, moved.text
    assert moved.json()["version"] == 3

    stale = api.client.post(
        f"/v1/patients/{key}/attendance",
        json={"service_date": days_ago(0)[:10], "hours": 3},
        headers=api.auth("clinician", **{"If-Match": '"2"'}),
    )
    assert stale.status_code == 409
    assert stale.headers["content-type"] == "application/problem+json"
    problem = stale.json()
    assert (problem["rule"], problem["expected"], problem["actual"]) == (
        "stream.version_conflict",
        2,
        3,
    )
    assert (
        api.client.get(f"/v1/patients/{key}", headers=api.auth("clinician")).json()["version"] == 3
    )  # nothing written


def test_refused_transition_names_the_rule_and_the_values(api: Api) -> None:
    key = admit(api, days=20)["patient_key"]
    api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"occurred_at": days_ago(12), "assessment": assessment("000020", hours=12)},
        headers=api.auth("clinician"),
    ).raise_for_status()
    head = api.head()
    refused = api.client.post(
        f"/v1/patients/{key}/transitions", json={"to_level": "2.1"}, headers=api.auth("clinician")
    )
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    assert problem["rule"] == "reassessment.stale"
    assert problem["policy"].startswith("asam-3@")
    assert "12 days" in problem["detail"] and "7 days" in problem["detail"]
    assert problem["type"] == "urn:care-continuum:problem:reassessment.stale"
    assert problem["instance"] == f"/v1/patients/{key}/transitions"
    assert api.head() == head


def test_invalid_input_is_422_with_each_field_and_reason(api: Api) -> None:
    head = api.head()
    body = admit_body()
    body["assessment"]["ratings"]["3"] = "9"
    body["level"] = "not a level!"
    response = api.client.post("/v1/patients", json=body, headers=api.auth("clinician"))
    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert "body.level" in fields
    # The policy's own check (rating scale) answers once the shape is right.
    body["level"] = "3.5"
    response = api.client.post("/v1/patients", json=body, headers=api.auth("clinician"))
    assert response.status_code == 422, response.text
    assert response.json()["rule"] == "assessment.rating_out_of_range"
    assert response.json()["field"] == "assessment.ratings.3"
    assert api.head() == head


def test_unknown_patient_route_and_bad_headers(api: Api) -> None:
    missing = api.client.get("/v1/patients/pk-aaaaaaaaaaaaaaaaaaaa", headers=api.auth("auditor"))
    assert (missing.status_code, missing.json()["rule"]) == (404, "patient.unknown")
    route = api.client.get("/v1/nothing-here", headers=api.auth("auditor"))
    assert route.status_code == 404
    assert route.headers["content-type"] == "application/problem+json"
    key = admit(api)["patient_key"]
    bad = api.client.post(
        f"/v1/patients/{key}/attendance",
        json={"service_date": days_ago(0)[:10], "hours": 2},
        headers=api.auth("clinician", **{"If-Match": "yesterday"}),
    )
    assert (bad.status_code, bad.json()["field"]) == (400, "If-Match")
    bad_key = api.client.post(
        f"/v1/patients/{key}/attendance",
        json={"service_date": days_ago(0)[:10], "hours": 2},
        headers=api.auth("clinician", **{"Idempotency-Key": "no spaces allowed"}),
    )
    assert (bad_key.status_code, bad_key.json()["field"]) == (400, "Idempotency-Key")


def test_idempotency_key_makes_a_retry_safe(api: Api) -> None:
    key = admit(api)["patient_key"]
    body = {"service_date": days_ago(1)[:10], "hours": 3}
    headers = api.auth("clinician", **{"Idempotency-Key": "visit-42"})
    first = api.client.post(f"/v1/patients/{key}/attendance", json=body, headers=headers)
    again = api.client.post(f"/v1/patients/{key}/attendance", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["events"] == again.json()["events"]
    assert (first.json()["replayed"], again.json()["replayed"]) == (False, True)
    timeline = api.client.get(f"/v1/patients/{key}/timeline", headers=api.auth("clinician"))
    assert [e["event"]["event_type"] for e in timeline.json()["events"]] == [
        "PatientAdmitted",
        "AttendanceRecorded",
    ]
    # The same key with another request is refused, and writes nothing.
    other = api.client.post(
        f"/v1/patients/{key}/attendance", json={**body, "hours": 4}, headers=headers
    )
    assert (other.status_code, other.json()["rule"]) == (409, "idempotency.key_reused")
    # Keys belong to their caller: another subject's same key is a new request.
    mine = api.client.post(
        f"/v1/patients/{key}/attendance",
        json=body,
        headers={
            "Authorization": "Bearer " + api.token("clinician", subject="user-other"),
            "Idempotency-Key": "visit-42",
        },
    )
    assert mine.status_code == 201 and mine.json()["replayed"] is False


def test_void_discharge_and_readmit(api: Api) -> None:
    key = admit(api, days=30)["patient_key"]
    attended = api.client.post(
        f"/v1/patients/{key}/attendance",
        json={"service_date": days_ago(2)[:10], "hours": 5},
        headers=api.auth("clinician"),
    ).json()
    voided = api.client.post(
        f"/v1/patients/{key}/voids",
        json={"event_id": attended["events"][0]["event_id"], "reason": "entered_in_error"},
        headers=api.auth("clinician"),
    )
    assert voided.status_code == 201, voided.text
    timeline = api.client.get(f"/v1/patients/{key}/timeline", headers=api.auth("clinician"))
    assert [e["voided"] for e in timeline.json()["events"]] == [False, True, False]
    discharged = api.client.post(
        f"/v1/patients/{key}/discharges",
        json={"reason": "completed", "disposition": "home", "occurred_at": days_ago(1)},
        headers=api.auth("clinician"),
    )
    assert discharged.status_code == 201, discharged.text
    readmitted = api.client.post(
        f"/v1/patients/{key}/readmissions",
        json={"level": "3.5", "site": "site-a", "assessment": assessment("001040")},
        headers=api.auth("clinician"),
    )
    assert readmitted.status_code == 201, readmitted.text
    state = api.client.get(f"/v1/patients/{key}", headers=api.auth("clinician")).json()
    assert (state["state"], state["episode"]["number"]) == ("3.5", 2)


def test_fhir_export_validates_and_carries_the_timeline(api: Api) -> None:
    from fhir.resources.R4B.bundle import Bundle

    key = admit(api, days=20, identity=IDENTITY)["patient_key"]
    api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"occurred_at": days_ago(1), "assessment": assessment("000020", hours=12)},
        headers=api.auth("clinician"),
    ).raise_for_status()
    api.client.post(
        f"/v1/patients/{key}/transitions", json={"to_level": "2.1"}, headers=api.auth("clinician")
    ).raise_for_status()

    response = api.client.get(f"/v1/patients/{key}/fhir", headers=api.auth("auditor"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.headers["ETag"] == '"3"'
    bundle = Bundle.model_validate_json(response.text)  # validates every resource
    kinds = [entry.resource.get_resource_type() for entry in bundle.entry or []]
    assert kinds.count("EpisodeOfCare") == 1
    assert kinds.count("Encounter") == 2  # the 3.5 stay, then 2.1
    assert kinds.count("Observation") == 2  # the admission and the reassessment
    assert "Quillfeather" not in response.text  # a pseudonymous key, never identity
    log = api.client.get(
        "/v1/access-log", params={"patient_key": key}, headers=api.auth("auditor")
    ).json()
    assert "patient.fhir" in {entry["action"] for entry in log["entries"]}
