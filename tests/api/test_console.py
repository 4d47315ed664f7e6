"""The web console without a browser (TestClient): sign-in and its cookie, CSRF, the same
role and site rules as the API (403 pages, no identity where the API shows none, no forms for
read-only roles), the access log, inline errors from the service's refusals, the version
conflict, and that the console stays out of the OpenAPI document."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Api, admit_body, assessment

IDENTITY = {"given_name": "Robin", "family_name": "Placeholder", "birth_date": "1991-02-03"}


def admit(api: Api, site: str = "site-a", days: float = 20, **extra: Any) -> str:
    response = api.client.post(
        "/v1/patients",
        json=admit_body(site=site, days=days, **extra),
        headers=api.auth("clinician", (site,)),
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["patient_key"]
    return key


def signed_in(api: Api, role: str, sites: tuple[str, ...] = ("site-a",)) -> TestClient:
    """A browser-like client signed in through the sign-in form with a pasted token."""
    client = TestClient(api.client.app, raise_server_exceptions=False)
    page = client.get("/console/sign-in")
    assert page.status_code == 200
    response = client.post(
        "/console/sign-in",
        data={"csrf_token": csrf(client), "token": api.token(role, sites)},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return client


def csrf(client: TestClient) -> str:
    value = client.cookies.get("continuum_console_csrf")
    assert value
    return value


def errors(html: str) -> dict[str, str]:
    """Inline field errors: the id of the message (field-error) -> its text."""
    return dict(re.findall(r'class="field-error" id="([^"]+)-error">([^<]+)<', html))


def version(api: Api, key: str) -> int:
    return api.ctx.app.service.load(key).version


def reassessment_form(client: TestClient, version: int, **fields: str) -> dict[str, str]:
    form = {
        "csrf_token": csrf(client),
        "version": str(version),
        "instrument": "asam-crit",
        "assessor_id": "cm-1",
        "hours_scheduled": "12",
        **{f"rating_{d}": r for d, r in zip("123456", "001200", strict=True)},
    }
    form.update(fields)
    return form


# -- sign-in, cookies, CSRF ---------------------------------------------------------------------


def test_sign_in_keeps_the_token_in_an_httponly_strict_cookie_and_sign_out_clears_it(
    sqlite_api: Api,
) -> None:
    client = TestClient(sqlite_api.client.app, raise_server_exceptions=False)
    assert client.get("/", follow_redirects=False).headers["location"] == "/console"
    assert (
        client.get("/console", follow_redirects=False)
        .headers["location"]
        .endswith("/console/sign-in")
    )
    token = sqlite_api.token("case_manager")
    client.get("/console/sign-in")
    response = client.post(
        "/console/sign-in",
        data={"csrf_token": csrf(client), "token": f"Bearer {token}"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"continuum_console_session={token};")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Path=/console" in cookie
    census = client.get("/console/census")
    assert census.status_code == 200
    assert "user-case_manager" in census.text
    assert "default-src 'self'" in census.headers["content-security-policy"]
    out = client.post(
        "/console/sign-out", data={"csrf_token": csrf(client)}, follow_redirects=False
    )
    assert out.status_code == 303
    assert 'continuum_console_session=""' in out.headers["set-cookie"]
    assert "Max-Age=0" in out.headers["set-cookie"]
    again = client.get("/console/census", follow_redirects=False)
    assert again.status_code == 303
    assert again.headers["location"].endswith("/console/sign-in")


def test_a_bad_token_is_refused_beside_the_field(sqlite_api: Api) -> None:
    client = TestClient(sqlite_api.client.app, raise_server_exceptions=False)
    client.get("/console/sign-in")
    tampered = sqlite_api.token("clinician")[:-6] + "AAAAAA"
    response = client.post("/console/sign-in", data={"csrf_token": csrf(client), "token": tampered})
    assert response.status_code == 401
    assert "access.token.signature" in errors(response.text)["token"]
    assert 'aria-describedby="token-error"' in response.text
    assert "continuum_console_session" not in client.cookies
    assert tampered not in response.text  # the token is never echoed


def test_a_post_without_its_csrf_token_is_refused_and_writes_nothing(sqlite_api: Api) -> None:
    key = admit(sqlite_api)
    client = signed_in(sqlite_api, "case_manager")
    before = version(sqlite_api, key)
    form = reassessment_form(client, before)
    del form["csrf_token"]
    refused = client.post(f"/console/patients/{key}/reassessments", data=form)
    assert refused.status_code == 403
    assert "console.csrf" in refused.text
    wrong = client.post(
        f"/console/patients/{key}/reassessments", data={**form, "csrf_token": "x" * 43}
    )
    assert wrong.status_code == 403
    other_site = client.post(
        f"/console/patients/{key}/reassessments",
        data=reassessment_form(client, before),
        headers={"Origin": "https://evil.example"},
    )
    assert other_site.status_code == 403
    assert version(sqlite_api, key) == before
    # A fresh client (no CSRF cookie) cannot sign in by posting a token either.
    bare = TestClient(sqlite_api.client.app, raise_server_exceptions=False)
    response = bare.post(
        "/console/sign-in",
        data={"csrf_token": "y" * 43, "token": sqlite_api.token("auditor")},
        follow_redirects=False,
    )
    assert response.status_code == 403
    assert "continuum_console_session" not in bare.cookies
    # With the token, the same post goes through.
    done = client.post(
        f"/console/patients/{key}/reassessments",
        data=reassessment_form(client, before),
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert version(sqlite_api, key) == before + 1


def test_the_role_picker_works_only_from_this_machine(sqlite_api: Api) -> None:
    app = sqlite_api.client.app
    local = TestClient(app, raise_server_exceptions=False, client=("127.0.0.1", 50000))
    assert "Sign in as this role" in local.get("/console/sign-in").text
    response = local.post(
        "/console/sign-in",
        data={"csrf_token": csrf(local), "role": "clinician", "sites": "site-a, site-b"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert "sites site-a, site-b" in local.get("/console/census").text
    missing = TestClient(app, raise_server_exceptions=False, client=("127.0.0.1", 50001))
    missing.get("/console/sign-in")
    refused = missing.post(
        "/console/sign-in", data={"csrf_token": csrf(missing), "role": "case_manager", "sites": ""}
    )
    assert refused.status_code == 422
    assert "site" in errors(refused.text)["sites"]
    remote = TestClient(app, raise_server_exceptions=False, client=("203.0.113.9", 50000))
    page = remote.get("/console/sign-in")
    assert "Sign in as this role" not in page.text
    denied = remote.post("/console/sign-in", data={"csrf_token": csrf(remote), "role": "admin"})
    assert denied.status_code == 403
    assert "continuum_console_session" not in remote.cookies


# -- the API's rules, in the console ------------------------------------------------------------


@pytest.mark.parametrize("page", ["", "/reassessments"])
def test_a_case_manager_of_site_a_cannot_open_a_site_b_patient(api: Api, page: str) -> None:
    key = admit(api, site="site-b", identity=IDENTITY)
    client = signed_in(api, "case_manager", ("site-a",))
    if page:
        response = client.post(f"/console/patients/{key}{page}", data=reassessment_form(client, 1))
    else:
        response = client.get(f"/console/patients/{key}")
    assert response.status_code == 403
    assert "access.site" in response.text
    assert "Placeholder" not in response.text
    assert version(api, key) == 1
    denied = [e for e in api.ctx.access_log.query(patient_key=key) if e.outcome == "denied"]
    assert denied
    assert denied[0].role == "case_manager"
    assert denied[0].resource.startswith("/console/patients/")


def test_the_patient_list_is_limited_to_the_callers_sites_and_audited(api: Api) -> None:
    mine = admit(api, site="site-a", identity=IDENTITY)
    theirs = admit(api, site="site-b")
    api.project()
    client = signed_in(api, "case_manager", ("site-a",))
    page = client.get("/console/patients")
    assert mine in page.text
    assert theirs not in page.text
    assert "Robin Placeholder" in page.text  # case managers see identity
    by_name = client.get("/console/patients", params={"q": "placeholder"})
    assert mine in by_name.text
    nobody = client.get("/console/patients", params={"q": "nobody"}).text
    assert "0 patients in care" in nobody
    assert mine not in nobody
    listed = api.ctx.access_log.query(subject="user-case_manager")
    assert any(e.action == "patients.list" and e.channel == "http" for e in listed)


def test_integration_sees_no_patient_and_no_identity(sqlite_api: Api) -> None:
    key = admit(sqlite_api, identity=IDENTITY)
    sqlite_api.project()
    client = signed_in(sqlite_api, "integration")
    home = client.get("/console")
    assert home.status_code == 200
    assert "No console views" in home.text
    for path in (f"/console/patients/{key}", "/console/patients", "/console/census"):
        response = client.get(path)
        assert response.status_code == 403, path
        assert "Robin" not in response.text
        assert "access.role" in response.text


def test_an_auditor_reads_without_identity_and_without_forms(sqlite_api: Api) -> None:
    key = admit(sqlite_api, identity=IDENTITY)
    sqlite_api.project()
    client = signed_in(sqlite_api, "auditor")
    page = client.get(f"/console/patients/{key}")
    assert page.status_code == 200
    assert key in page.text
    assert "Robin" not in page.text
    assert 'id="reassess-form"' not in page.text
    assert 'id="transition-form"' not in page.text
    listing = client.get("/console/patients")
    assert key in listing.text
    assert "Placeholder" not in listing.text
    assert "does not see names" in client.get("/console/patients", params={"q": "robin"}).text
    posted = client.post(
        f"/console/patients/{key}/reassessments", data=reassessment_form(client, 1)
    )
    assert posted.status_code == 403
    assert "access.role" in posted.text
    assert version(sqlite_api, key) == 1
    actions = {e.action for e in sqlite_api.ctx.access_log.query(patient_key=key)}
    assert {"patient.read", "patient.timeline"} <= actions


def test_a_clinician_sees_the_forms_and_an_admin_only_aggregates(sqlite_api: Api) -> None:
    key = admit(sqlite_api, identity=IDENTITY)
    sqlite_api.project()
    page = signed_in(sqlite_api, "clinician").get(f"/console/patients/{key}")
    assert 'id="reassess-form"' in page.text
    assert 'id="transition-form"' in page.text
    assert "Robin Placeholder" in page.text
    admin = signed_in(sqlite_api, "admin")
    census = admin.get("/console/census")
    assert census.status_code == 200
    assert "Your role sees aggregates only" in census.text
    assert key not in census.text
    assert admin.get(f"/console/patients/{key}").status_code == 403
    assert admin.get("/console/audit").status_code == 403


# -- forms: the service's refusals beside their fields ------------------------------------------


def test_invalid_input_is_shown_beside_each_field(sqlite_api: Api) -> None:
    key = admit(sqlite_api)
    client = signed_in(sqlite_api, "case_manager")
    form = reassessment_form(client, 1, rating_3="", assessor_id="dr who")
    response = client.post(f"/console/patients/{key}/reassessments", data=form)
    assert response.status_code == 422
    found = errors(response.text)
    assert found["rating_3"] == "choose a rating"
    missing = client.post(
        f"/console/patients/{key}/reassessments",
        data=reassessment_form(client, 1, assessor_id="dr who"),
    )
    assert "letters, digits" in errors(missing.text)["assessor_id"]
    assert 'aria-describedby="assessor_id-error"' in missing.text
    assert 'value="dr who"' in missing.text  # what was typed stays in the form
    off_scale = client.post(
        f"/console/patients/{key}/reassessments", data=reassessment_form(client, 1, rating_2="9")
    )
    assert off_scale.status_code == 422
    assert "assessment.rating_out_of_range" in errors(off_scale.text)["rating_2"]
    assert version(sqlite_api, key) == 1


def test_a_refused_transition_is_explained_beside_its_field(sqlite_api: Api) -> None:
    key = admit(sqlite_api, days=20)
    client = signed_in(sqlite_api, "case_manager")
    stale = client.post(
        f"/console/patients/{key}/transitions",
        data={"csrf_token": csrf(client), "version": "1", "to_level": "2.1"},
    )
    assert stale.status_code == 409
    message = errors(stale.text)["reassessment_event_id"]
    assert "needs a reassessment within 7 days; latest is 20 days old" in message
    assert "reassessment.stale" in message
    assert "asam-3@" in message
    not_allowed = client.post(
        f"/console/patients/{key}/transitions",
        data={"csrf_token": csrf(client), "version": "1", "to_level": "0.5"},
        headers={"HX-Request": "true"},
    )
    assert not_allowed.status_code == 409
    assert not_allowed.text.lstrip().startswith("<form")  # htmx gets the form alone
    assert "transition.not_allowed" in errors(not_allowed.text)["to_level"]
    assert version(sqlite_api, key) == 1


def test_a_version_conflict_says_someone_else_changed_the_patient(sqlite_api: Api) -> None:
    key = admit(sqlite_api)
    client = signed_in(sqlite_api, "case_manager")
    page = client.get(f"/console/patients/{key}")
    rendered = int(re.search(r'name="version" value="(\d+)"', page.text).group(1))  # type: ignore[union-attr]
    assert rendered == 1
    changed = sqlite_api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"assessment": assessment("000200", hours=12)},
        headers=sqlite_api.auth("clinician"),
    )
    assert changed.status_code == 201
    response = client.post(
        f"/console/patients/{key}/reassessments", data=reassessment_form(client, rendered)
    )
    assert response.status_code == 409
    assert "Someone else changed this patient; reload." in response.text
    assert "opened at version 1; the patient is now at version 2" in response.text
    assert version(sqlite_api, key) == 2
    ok = client.post(
        f"/console/patients/{key}/transitions",
        data={"csrf_token": csrf(client), "version": "2", "to_level": "2.1"},
        headers={"HX-Request": "true"},
    )
    assert ok.status_code == 204
    assert ok.headers["HX-Redirect"] == f"/console/patients/{key}?done=transition"
    assert sqlite_api.ctx.app.service.load(key).state == "2.1"


# -- the audit view, assets, the OpenAPI document ---------------------------------------------


def test_audit_view_filters_and_exports_csv(sqlite_api: Api) -> None:
    key = admit(sqlite_api)
    sqlite_api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"assessment": assessment("000200", hours=12)},
        headers=sqlite_api.auth("clinician"),
    )
    moved = sqlite_api.client.post(
        f"/v1/patients/{key}/transitions",
        json={"to_level": "2.1"},
        headers=sqlite_api.auth("clinician"),
    )
    assert moved.status_code == 201
    sqlite_api.project()
    client = signed_in(sqlite_api, "case_manager")
    page = client.get("/console/audit", params={"flagged": "yes"})
    assert key in page.text
    assert "skipped levels" in page.text
    exported = client.get("/console/audit.csv", params={"flagged": "yes", "site": "site-a"})
    assert exported.headers["content-type"].startswith("text/csv")
    lines = exported.text.strip().splitlines()
    assert len(lines) == 2
    assert key in lines[1]
    elsewhere = client.get("/console/audit", params={"site": "site-z"})
    assert key not in elsewhere.text
    bad = client.get("/console/audit", params={"from": "yesterday"})
    assert "a date such as" in bad.text


def test_assets_are_shipped_and_user_text_is_escaped(sqlite_api: Api) -> None:
    client = signed_in(sqlite_api, "clinician")
    htmx = client.get("/console/static/htmx.min.js")
    assert htmx.status_code == 200
    assert htmx.text.startswith("/*! htmx 2.")
    page = client.get("/console/patients", params={"q": "<script>alert(1)</script>"})
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;" in page.text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources
    assert all(s.startswith(("/", "?", "#")) for s in sources), sources


def test_the_console_is_not_in_the_openapi_document(sqlite_api: Api) -> None:
    paths = sqlite_api.client.get("/openapi.json").json()["paths"]
    assert paths
    assert not [p for p in paths if p.startswith("/console") or p == "/"]
    # The API keeps refusing form bodies: only the console takes them.
    refused = sqlite_api.client.post(
        "/v1/patients",
        content="level=3.5",
        headers={
            **sqlite_api.auth("clinician"),
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert refused.status_code == 415
