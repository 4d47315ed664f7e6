"""Every error as RFC 9457 problem details (application/problem+json).

    status  when
    400     a malformed header (If-Match, Idempotency-Key, X-Purpose-Of-Use)
    401     no bearer token, or one that does not verify (with WWW-Authenticate)
    403     authenticated, but the role or the site does not allow it
    404     no such patient, event, route
    409     a refused command (the rule and the values) or a version conflict (expected, actual)
    413     body larger than the configured limit
    415     a body that is not application/json
    422     invalid input: each field and its reason
    503     the database is not ready (schema behind, server down)

The body always carries `type`, `title`, `status`, `detail` and `instance`, plus `rule` (a stable
code for clients and metrics), `field` when one input field is at fault, `errors` (every field
and its reason) for 422, `policy` when a policy rule decided, and `request_id`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from continuum.adapters.auth.tokens import IssuerUnavailable
from continuum.application.access import AccessDenied, NotAuthenticated
from continuum.domain import errors as e

log = logging.getLogger("continuum.http")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:care-continuum:problem:"

#: Most specific first: the first matching class decides the status.
STATUS: list[tuple[type[e.ContinuumError], int]] = [
    (NotAuthenticated, 401),
    (IssuerUnavailable, 503),
    (AccessDenied, 403),
    (e.ConcurrencyConflict, 409),
    (e.NotFound, 404),
    (e.InvalidInput, 422),
    (e.CommandRefused, 409),
    (e.Duplicate, 409),
    (e.StoreNotReady, 503),
]

TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid input",
    428: "Precondition required",
    500: "Internal error",
    503: "Service unavailable",
}


class HeaderProblem(e.InvalidInput):
    """A request header is malformed (HTTP 400)."""

    rule = "http.header_invalid"


def problem(
    request: Request,
    status: int,
    detail: str,
    *,
    rule: str,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + rule,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "rule": rule,
        "request_id": getattr(request.state, "request_id", None),
    }
    body.update({k: v for k, v in extensions.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def status_of(exc: e.ContinuumError) -> int:
    if isinstance(exc, HeaderProblem):
        return 400
    return next((status for kind, status in STATUS if isinstance(exc, kind)), 500)


async def continuum_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.ContinuumError)
    status = status_of(exc)
    data = exc.as_dict()
    headers = None
    if status == 401:
        challenge = f'Bearer error="invalid_token", error_description="{exc.rule}"'
        headers = {"WWW-Authenticate": challenge}
        if exc.rule == "access.token.missing":
            headers = {"WWW-Authenticate": 'Bearer realm="care-continuum"'}
    extensions: dict[str, Any] = {
        "field": data["field"],
        "policy": data["policy"],
        "details": data["details"] or None,
    }
    if isinstance(exc, e.ConcurrencyConflict):
        extensions.update(expected=exc.expected, actual=exc.actual)
    if status == 422 and data["field"]:
        extensions["errors"] = [{"field": data["field"], "reason": exc.message}]
    return problem(request, status, exc.message, rule=exc.rule, headers=headers, **extensions)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    return ".".join(parts) or "body"


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(item.get("loc", ())), "reason": str(item.get("msg", "invalid"))}
        for item in exc.errors()
    ]
    first = errors[0] if errors else {"field": "body", "reason": "invalid"}
    detail = "; ".join(f"{item['field']}: {item['reason']}" for item in errors[:5])
    return problem(request, 422, detail, rule="input.invalid", field=first["field"], errors=errors)


async def query_error(request: Request, exc: Exception) -> JSONResponse:
    from continuum.entrypoints.http.deps import QueryProblem

    assert isinstance(exc, QueryProblem)
    return problem(
        request,
        422,
        f"{exc.field}: {exc.reason}",
        rule="input.invalid",
        field=exc.field,
        errors=[{"field": exc.field, "reason": exc.reason}],
    )


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    rule = {404: "route.not_found", 405: "method.not_allowed"}.get(exc.status_code, "http.error")
    return problem(
        request,
        exc.status_code,
        str(exc.detail),
        rule=rule,
        headers=dict(exc.headers) if exc.headers else None,
    )


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("database unavailable: %s", exc)
    return problem(
        request,
        503,
        "the database is unavailable; retry later (operators: check CONTINUUM_DATABASE_URL "
        "and the server)",
        rule="store.unavailable",
        headers={"Retry-After": "5"},
    )


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(
        request,
        500,
        "an internal error occurred; it has been logged with the request id",
        rule="internal",
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(e.ContinuumError, continuum_error)
    from continuum.entrypoints.http.deps import QueryProblem

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(QueryProblem, query_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OperationalError, database_error)
    app.add_exception_handler(Exception, unexpected_error)
