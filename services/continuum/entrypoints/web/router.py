"""The case managers' web console: server-rendered pages (Jinja2) with htmx, at /console.

Every page is a client of the API's own route functions (`http.routes.patients`,
`http.routes.reports`): the same permission checks, site scoping, identity rules and access
log rows, the same service layer for changes. This module only turns their answers into HTML
and form posts into their request bodies. The routes are left out of the OpenAPI document.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.responses import RedirectResponse, Response

from continuum.adapters.auth.tokens import IssuerUnavailable
from continuum.application.access import (
    AccessDenied,
    NotAuthenticated,
    Permission,
    Principal,
    Role,
)
from continuum.domain import commands as c
from continuum.domain.errors import ContinuumError, InvalidInput, NotFound
from continuum.domain.policy import Policy
from continuum.entrypoints.http import models as m
from continuum.entrypoints.http.context import ApiContext
from continuum.entrypoints.http.deps import CODE_PATTERN, KEY_PATTERN, LEVEL_PATTERN, Ctx
from continuum.entrypoints.http.problems import status_of
from continuum.entrypoints.http.routes import patients as api_patients
from continuum.entrypoints.http.routes import reports as api_reports
from continuum.entrypoints.projections_cli import TrailFormat
from continuum.entrypoints.web import PREFIX, charts, forms
from continuum.entrypoints.web.session import (
    ConsoleCaller,
    CsrfRefused,
    Form,
    check_csrf,
    csrf_token,
    remember_csrf,
    sign_in_cookie,
    sign_out_cookie,
)
from continuum_events.codes import VarianceReason
from continuum_projections.fold import ContinuumFold
from continuum_projections.policyview import PolicyViews
from continuum_projections.reports import FLAGS

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))

#: Content Security Policy for every console page: scripts, styles and images from the
#: console itself only (htmx is shipped in the package), no framing, forms post here only.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)

FLAG_LABELS = {
    "flag_stale_reassessment": "stale reassessment",
    "flag_level_differs": "level differs from indicated",
    "flag_skipped_levels": "skipped levels",
    "flag_hours_below_band": "hours below band",
    "flag_readmission_30d": "readmission within 30 days",
}


class ConsoleRoute(APIRoute):
    """Answers the console's errors as pages, not problem+json: no session -> the sign-in
    page; the role or site refuses -> 403 page; unknown patient -> 404 page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def console_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except NotAuthenticated as exc:
                target = f"{PREFIX}/sign-in"
                if exc.rule != "access.token.missing":
                    target += "?expired=1"
                response = RedirectResponse(target, status_code=303)
                if request.headers.get("hx-request"):
                    response = Response(status_code=204, headers={"HX-Redirect": target})
            except (AccessDenied, CsrfRefused) as exc:
                response = _error_page(request, 403, "Not allowed", exc.message, exc.rule)
            except NotFound as exc:
                response = _error_page(request, 404, "Not found", exc.message, exc.rule)
            except IssuerUnavailable as exc:
                response = _error_page(request, 503, "Sign-in unavailable", exc.message, exc.rule)
            except RequestValidationError as exc:
                detail = "; ".join(
                    f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                    for e in exc.errors()[:5]
                )
                response = _error_page(request, 404, "Not found", detail, "input.invalid")
            except InvalidInput as exc:
                response = _error_page(request, 422, "Invalid input", exc.message, exc.rule)
            _secure_headers(request, response)
            return response

        return console_handler


router = APIRouter(prefix=PREFIX, include_in_schema=False, route_class=ConsoleRoute)
root = APIRouter(include_in_schema=False)


def _secure_headers(request: Request, response: Response) -> None:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    remember_csrf(request, response)


def _page(
    request: Request,
    name: str,
    context: Mapping[str, Any],
    *,
    caller: Principal | None = None,
    status_code: int = 200,
) -> Response:
    ctx: ApiContext = request.app.state.ctx
    full = {
        "caller": caller,
        "nav": _nav(caller),
        "csrf": csrf_token(request),
        "auth_mode": ctx.app.settings.auth_mode,
        "prefix": PREFIX,
        "flag_labels": FLAG_LABELS,
        **context,
    }
    return templates.TemplateResponse(request, name, full, status_code=status_code)


def _error_page(request: Request, status: int, title: str, message: str, rule: str) -> Response:
    caller = getattr(request.state, "principal", None)
    return _page(
        request,
        "error.html",
        {"title": title, "status": status, "message": message, "rule": rule},
        caller=caller if isinstance(caller, Principal) else None,
        status_code=status,
    )


def _nav(caller: Principal | None) -> list[tuple[str, str, str]]:
    if caller is None:
        return []
    items = []
    if caller.can(Permission.READ_AGGREGATES):
        items.append(("census", "Census", f"{PREFIX}/census"))
    if caller.can(Permission.READ_PATIENT):
        items.append(("patients", "Patients", f"{PREFIX}/patients"))
    if caller.can(Permission.READ_AUDIT_TRAIL):
        items.append(("audit", "Audit trail", f"{PREFIX}/audit"))
    return items


def _json(response: Response) -> dict[str, Any]:
    """The body of an API route's JSONResponse (the console shows what the API answers)."""
    data: dict[str, Any] = json.loads(bytes(response.body))
    return data


def _policy_for(ctx: ApiContext, label: str | None) -> Policy:
    if label and "@" in label:
        policy_id, version = label.split("@", 1)
        try:
            return ctx.app.policies.get(policy_id, version)
        except ContinuumError:
            pass
    return ctx.app.policies.default


# -- sign-in -----------------------------------------------------------------------------------


@root.get("/", include_in_schema=False)
def to_console() -> RedirectResponse:
    return RedirectResponse(PREFIX, status_code=307)


@router.get("")
def home(request: Request, ctx: Ctx) -> Response:
    from continuum.entrypoints.web.session import console_principal

    try:
        caller = console_principal(request, ctx)
    except NotAuthenticated:
        return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    nav = _nav(caller)
    if nav:
        return RedirectResponse(nav[0][2], status_code=303)
    return _page(request, "nothing.html", {"title": "No console views"}, caller=caller)


def _may_mint(request: Request, ctx: ApiContext) -> bool:
    """The dev issuer's role picker: only in dev mode, and only for a browser on this machine
    (anyone who reaches it could otherwise sign in as any role)."""
    if ctx.app.settings.auth_mode != "dev" or request.client is None:
        return False
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def _sign_in_page(
    request: Request, ctx: ApiContext, state: forms.FormState, status_code: int = 200
) -> Response:
    return _page(
        request,
        "sign_in.html",
        {
            "title": "Sign in",
            "form": state,
            "may_mint": _may_mint(request, ctx),
            "roles": [r.value for r in Role],
            "issuer": ctx.app.settings.auth_issuer,
        },
        status_code=status_code,
    )


@router.get("/sign-in")
def sign_in_page(request: Request, ctx: Ctx, expired: bool = False) -> Response:
    state = forms.FormState()
    if expired:
        state.summary = (
            "Your session ended (the token expired or no longer verifies); sign in again."
        )
    return _sign_in_page(request, ctx, state)


@router.post("/sign-in")
def sign_in(request: Request, ctx: Ctx, form: Form) -> Response:
    check_csrf(request, form)
    state = forms.FormState(values={k: v for k, v in form.items() if k != "token"})
    token = form.get("token", "").strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token and form.get("role"):
        if not _may_mint(request, ctx):
            raise AccessDenied(
                "the role picker works only with the development issuer, from this machine; "
                "paste a token instead",
                rule="console.mint",
            )
        minted = _mint(ctx, form, state)
        if minted is None:
            return _sign_in_page(request, ctx, state, 422)
        token = minted
    if not token:
        state.errors["token"] = "paste a bearer token"
        return _sign_in_page(request, ctx, state, 422)
    try:
        ctx.verifier.verify(token)
    except NotAuthenticated as exc:
        state.errors["token"] = f"{exc.message} [rule {exc.rule}]"
        return _sign_in_page(request, ctx, state, 401)
    response = RedirectResponse(PREFIX, status_code=303)
    sign_in_cookie(request, response, token)
    return response


def _mint(ctx: ApiContext, form: Mapping[str, str], state: forms.FormState) -> str | None:
    from continuum.adapters.auth.tokens import DevIssuer

    settings = ctx.app.settings
    role = form.get("role", "")
    sites = [s for s in re.split(r"[\s,]+", form.get("sites", "")) if s]
    subject = form.get("subject", "").strip() or f"dev-{role}"
    issuer = DevIssuer.load_or_create(settings.dev_issuer_key_file, audience=settings.auth_audience)
    try:
        return issuer.issue(subject, role, sites=sites, ttl_seconds=8 * 3600)
    except InvalidInput as exc:
        name = {"sites": "sites", "role": "role", "sub": "subject"}.get(exc.field or "", "role")
        state.errors[name] = exc.message
        return None


@router.post("/sign-out")
def sign_out(request: Request, form: Form) -> Response:
    check_csrf(request, form)
    response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    sign_out_cookie(request, response)
    return response


# -- census ------------------------------------------------------------------------------------


@router.get("/census")
def census_page(request: Request, ctx: Ctx, caller: ConsoleCaller) -> Response:
    census = _json(api_reports.census(ctx, caller))
    daily = _json(api_reports.daily_census(ctx, caller, days=90))
    chart, colours = charts.daily_census_svg(daily["days"], ctx.level_order)
    overdue: m.PatientList | None = None
    if caller.can(Permission.READ_PATIENT):
        overdue = api_reports.list_patients(
            ctx, caller, None, request, overdue=True, limit=50, offset=0
        )
    sites = census["sites"]
    levels = [code for code in census["levels"] if census["levels"][code]]
    return _page(
        request,
        "census.html",
        {
            "title": "Census",
            "active": "census",
            "census": census,
            "levels": levels,
            "site_names": sorted(sites),
            "daily": daily,
            "chart": chart,
            "colours": colours,
            "overdue": overdue,
            "window_days": ctx.app.policies.default.reassessment_window_days,
        },
        caller=caller,
    )


# -- patients ----------------------------------------------------------------------------------

_KEY_PREFIX = re.compile(r"^pk(?:-[a-z2-7]{0,20})?$")
_LEVEL = re.compile(LEVEL_PATTERN)
_CODE = re.compile(CODE_PATTERN)
PAGE_SIZE = 50
#: Name search reads this many patients of the caller's sites and matches names among them.
NAME_SEARCH_SCAN = 1000

Text = Annotated[str, Query(max_length=100)]


@router.get("/patients")
def patients_page(
    request: Request,
    ctx: Ctx,
    caller: ConsoleCaller,
    level: Text = "",
    site: Text = "",
    min_days: Text = "",
    overdue: Text = "",
    q: Text = "",
    page: Annotated[int, Query(ge=1, le=10_000)] = 1,
) -> Response:
    problems: dict[str, str] = {}
    level_value = level.strip() or None
    if level_value and not _LEVEL.match(level_value):
        problems["level"] = "not a level code"
    site_value = site.strip() or None
    if site_value and not _CODE.match(site_value):
        problems["site"] = "not a site code"
    days_value: int | None = None
    if min_days.strip():
        if min_days.strip().isdigit() and int(min_days) <= 36500:
            days_value = int(min_days)
        else:
            problems["min_days"] = "a whole number of days"
    overdue_value = {"yes": True, "no": False}.get(overdue)
    query = q.strip()
    key_prefix: str | None = None
    name_query: str | None = None
    if query:
        if _KEY_PREFIX.match(query.lower()):
            key_prefix = query.lower()
        elif caller.sees_identity():
            name_query = query.casefold()
        else:
            problems["q"] = (
                f"search by pseudonymous key (pk-...); role {caller.role.value} does not see names"
            )
    result: m.PatientList | None = None
    rows: list[m.PatientRow] = []
    total = 0
    if not problems:
        result = api_reports.list_patients(
            ctx,
            caller,
            None,
            request,
            level=level_value,
            site=site_value,
            overdue=overdue_value,
            min_days_in_level=days_value,
            key=key_prefix,
            limit=NAME_SEARCH_SCAN if name_query else PAGE_SIZE,
            offset=0 if name_query else (page - 1) * PAGE_SIZE,
        )
        rows, total = result.patients, result.total
        if name_query is not None:
            rows = [r for r in rows if _name_matches(r, name_query)]
            total = len(rows)
            rows = rows[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    context = {
        "title": "Patients",
        "active": "patients",
        "rows": rows,
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "problems": problems,
        "filters": {
            "level": level,
            "site": site,
            "min_days": min_days,
            "overdue": overdue,
            "q": q,
        },
        "level_codes": ctx.level_order,
        "sees_identity": caller.sees_identity(),
        "sites": sorted(caller.sites) if caller.site_filter() is not None else [],
    }
    name = "_patient_rows.html" if request.headers.get("hx-request") else "patients.html"
    return _page(request, name, context, caller=caller)


def _name_matches(row: m.PatientRow, query: str) -> bool:
    if row.identity is None:
        return False
    who = row.identity
    full = f"{who.given_name} {who.family_name}".casefold()
    return query in full or query == (who.mrn or "").casefold()


def _patient_context(
    request: Request, ctx: ApiContext, caller: Principal, key: str
) -> dict[str, Any]:
    """Everything the patient page shows, read through the API's route functions (two
    access-log rows: patient.read and patient.timeline)."""
    view = api_patients.read_patient(key, ctx, caller, None, request, Response())
    timeline = api_patients.timeline(key, ctx, caller, None, request, Response())
    policy = _policy_for(ctx, view.episode.policy if view.episode else None)
    # The read models' own fold over this patient's events: stays and the audit-trail rows
    # exactly as the projections make them, current to the version shown.
    fold = ContinuumFold(PolicyViews(ctx.app.policies))
    for item in timeline.events:
        fold.apply(item.event)
    changes, _ = fold.take()
    stays_rows = sorted(changes.inserted("stays").values(), key=lambda r: str(r["started_at"]))
    stays = [
        charts.Stay(
            level=r["level"],
            site=r["site"],
            started_at=dt.datetime.fromisoformat(r["started_at"]),
            ended_at=dt.datetime.fromisoformat(r["ended_at"]) if r.get("ended_at") else None,
            voided=bool(r["voided"]),
            end_kind=r.get("end_kind"),
        )
        for r in stays_rows
    ]
    trail = sorted(changes.inserted("transitions").values(), key=lambda r: str(r["occurred_at"]))
    for row in trail:
        row["flags"] = [FLAG_LABELS.get(f, f) for f in FLAGS if row.get(f)]
        row["ratings_map"] = json.loads(row["ratings"]) if row.get("ratings") else {}
    assessments = []
    choices: list[tuple[str, str]] = []
    episode_id = str(view.episode.episode_id) if view.episode else None
    for item in timeline.events:
        event = item.event
        data = event["data"]
        if event["event_type"] not in (
            "PatientAdmitted",
            "PatientReadmitted",
            "ReassessmentRecorded",
        ):
            continue
        a = data["assessment"]
        level = data.get("level_at_assessment") or data.get("placement", {}).get("level")
        assessments.append(
            {
                "event_id": event["event_id"],
                "occurred_at": event["occurred_at"],
                "kind": {
                    "PatientAdmitted": "admission",
                    "PatientReadmitted": "readmission",
                }.get(event["event_type"], "reassessment"),
                "level": level,
                "ratings": a["ratings"],
                "indicated": a["indicated_level"],
                "hours": a.get("hours_scheduled"),
                "assessor": a["assessor_id"],
                "instrument": a["instrument"],
                "voided": item.voided,
            }
        )
        if not item.voided and data.get("episode_id") == episode_id:
            choices.append(
                (event["event_id"], f"{event['occurred_at'][:16]} indicated {a['indicated_level']}")
            )
    now = dt.datetime.now(dt.UTC)
    terminal = policy.terminal_state
    editable = view.active and view.site is not None
    can_reassess = editable and _allowed(caller, Permission.REASSESS, view.site)
    can_transition = editable and _allowed(caller, Permission.TRANSITION, view.site)
    latest = view.latest_assessment
    overdue = view.active and (
        latest is None
        or latest.occurred_at < now - dt.timedelta(days=policy.reassessment_window_days)
    )
    return {
        "title": f"Patient {key}",
        "active": "patients",
        "patient": view,
        "timeline": timeline,
        "policy": policy,
        "bands": charts.level_bands_svg(stays, [lv.code for lv in policy.levels], now),
        "stays": stays,
        "trail": trail,
        "assessments": list(reversed(assessments)),
        "dimensions": [d.code for d in policy.dimensions],
        "dimension_names": {d.code: d.name for d in policy.dimensions},
        "rating_scale": policy.rating_scale,
        "level_choices": [(lv.code, lv.name) for lv in policy.levels if lv.code != view.state],
        "variance_reasons": [r.value for r in VarianceReason],
        "reassessment_choices": list(reversed(choices)),
        "can_reassess": can_reassess,
        "can_transition": can_transition,
        "terminal": terminal,
        "overdue": overdue,
        "window_days": policy.reassessment_window_days,
        "reassess_form": forms.FormState(
            values={"instrument": "asam-crit", "assessor_id": _assessor(caller)}
        ),
        "transition_form": forms.FormState(),
    }


def _assessor(caller: Principal) -> str:
    return api_patients.actor_of(caller).id


def _allowed(caller: Principal, permission: Permission, site: str | None) -> bool:
    return caller.can(permission) and caller.covers_site(site)


def _patient_key(value: str) -> str:
    if not re.match(KEY_PATTERN, value):
        raise NotFound(f"no patient with key {value[:40]!r}", rule="patient.unknown")
    return value


DONE = {"reassessment": "Reassessment recorded.", "transition": "Move recorded."}


@router.get("/patients/{patient_key}")
def patient_page(
    request: Request, ctx: Ctx, caller: ConsoleCaller, patient_key: str, done: Text = ""
) -> Response:
    key = _patient_key(patient_key)
    context = _patient_context(request, ctx, caller, key)
    context["done"] = DONE.get(done)
    return _page(request, "patient.html", context, caller=caller)


def _after_change(request: Request, key: str, what: str) -> Response:
    target = f"{PREFIX}/patients/{key}?done={what}"
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def _form_refused(
    request: Request,
    ctx: ApiContext,
    caller: Principal,
    key: str,
    which: str,
    state: forms.FormState,
    status: int,
) -> Response:
    """Re-render the form (htmx: just the form) with the refusal beside its field."""
    context = _patient_context(request, ctx, caller, key)
    context[f"{which}_form"] = state
    if request.headers.get("hx-request"):
        return _page(request, f"_{which}_form.html", context, caller=caller, status_code=status)
    return _page(request, "patient.html", context, caller=caller, status_code=status)


@router.post("/patients/{patient_key}/reassessments")
def post_reassessment(
    request: Request, ctx: Ctx, caller: ConsoleCaller, patient_key: str, form: Form
) -> Response:
    check_csrf(request, form)
    key = _patient_key(patient_key)
    state = forms.FormState(values=dict(form))
    view = api_patients.read_patient(key, ctx, caller, None, request, Response())
    policy = _policy_for(ctx, view.episode.policy if view.episode else None)
    dimensions = [d.code for d in policy.dimensions]
    inputs = [f"rating_{d}" for d in dimensions]
    inputs += ["ratings", "instrument", "assessor_id", "hours_scheduled", "occurred_at"]
    try:
        expected = forms.expected_version(form)
        body = forms.reassessment_body(form, dimensions)
        api_patients.run_command(
            ctx,
            caller,
            Permission.REASSESS,
            key,
            body,
            c.RecordReassessment,
            expected=expected,
            idempotency=None,
            response=Response(),
        )
    except forms.FormInvalid as exc:
        state.errors.update(exc.errors)
        return _form_refused(request, ctx, caller, key, "reassess", state, 422)
    except (AccessDenied, NotFound):
        raise
    except ContinuumError as exc:
        forms.refusal(state, exc, inputs, forms.REASSESSMENT_ALIASES)
        return _form_refused(request, ctx, caller, key, "reassess", state, status_of(exc))
    return _after_change(request, key, "reassessment")


@router.post("/patients/{patient_key}/transitions")
def post_transition(
    request: Request, ctx: Ctx, caller: ConsoleCaller, patient_key: str, form: Form
) -> Response:
    check_csrf(request, form)
    key = _patient_key(patient_key)
    state = forms.FormState(values=dict(form))
    inputs = [
        "to_level",
        "site",
        "reassessment_event_id",
        "variance_reason",
        "authorization_ref",
        "occurred_at",
        "hours_scheduled",
    ]
    try:
        expected = forms.expected_version(form)
        body = forms.transition_body(form)
        api_patients.run_command(
            ctx,
            caller,
            Permission.TRANSITION,
            key,
            body,
            c.Transition,
            expected=expected,
            idempotency=None,
            response=Response(),
            target_site=body.site,
        )
    except forms.FormInvalid as exc:
        state.errors.update(exc.errors)
        return _form_refused(request, ctx, caller, key, "transition", state, 422)
    except (AccessDenied, NotFound):
        raise
    except ContinuumError as exc:
        forms.refusal(state, exc, inputs, forms.TRANSITION_ALIASES)
        return _form_refused(request, ctx, caller, key, "transition", state, status_of(exc))
    return _after_change(request, key, "transition")


# -- the audit trail ---------------------------------------------------------------------------


def _trail_filters(
    start: str, end: str, flagged: str, site: str, patient_key: str
) -> tuple[dict[str, Any], dict[str, str]]:
    problems: dict[str, str] = {}
    values: dict[str, Any] = {"flagged": flagged == "yes"}
    for name, given in (("start", start), ("end", end)):
        text = given.strip()
        if text:
            try:
                dt.date.fromisoformat(text)
            except ValueError:
                problems["from" if name == "start" else "to"] = "a date such as 2026-11-20"
        values[name] = text or None
    values["site"] = site.strip() or None
    if values["site"] and not _CODE.match(values["site"]):
        problems["site"] = "not a site code"
    values["patient_key"] = patient_key.strip() or None
    if values["patient_key"] and not re.match(KEY_PATTERN, values["patient_key"]):
        problems["patient_key"] = "a full patient key (pk- and 20 letters or digits)"
    return values, problems


@router.get("/audit")
def audit_page(
    request: Request,
    ctx: Ctx,
    caller: ConsoleCaller,
    start: Annotated[str, Query(alias="from", max_length=40)] = "",
    end: Annotated[str, Query(alias="to", max_length=40)] = "",
    flagged: Text = "",
    site: Text = "",
    patient_key: Text = "",
) -> Response:
    values, problems = _trail_filters(start, end, flagged, site, patient_key)
    rows: list[dict[str, Any]] = []
    if not problems:
        answer = _json(
            api_reports.audit_trail(ctx, caller, None, request, **values, fmt=TrailFormat.JSON)
        )
        rows = answer["rows"]
        for row in rows:
            row["flags"] = [FLAG_LABELS.get(f, f) for f in FLAGS if row.get(f)]
    filters = {
        "from": start,
        "to": end,
        "flagged": flagged,
        "site": site,
        "patient_key": patient_key,
    }
    query = urlencode({k: v for k, v in filters.items() if v})
    context = {
        "title": "Step-down audit trail",
        "active": "audit",
        "rows": list(reversed(rows)),
        "problems": problems,
        "filters": filters,
        "csv_url": f"{PREFIX}/audit.csv" + (f"?{query}" if query else ""),
    }
    name = "_audit_rows.html" if request.headers.get("hx-request") else "audit.html"
    return _page(request, name, context, caller=caller)


@router.get("/audit.csv")
def audit_csv(
    request: Request,
    ctx: Ctx,
    caller: ConsoleCaller,
    start: Annotated[str, Query(alias="from", max_length=40)] = "",
    end: Annotated[str, Query(alias="to", max_length=40)] = "",
    flagged: Text = "",
    site: Text = "",
    patient_key: Text = "",
) -> Response:
    values, problems = _trail_filters(start, end, flagged, site, patient_key)
    if problems:
        raise InvalidInput(
            "; ".join(f"{k}: {v}" for k, v in problems.items()), rule="input.invalid"
        )
    return api_reports.audit_trail(ctx, caller, None, request, **values, fmt=TrailFormat.CSV)
