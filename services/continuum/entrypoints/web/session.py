"""Who is signed in to the console, and the CSRF check on every form it posts.

The console keeps the caller's bearer JWT in an HttpOnly, SameSite=Strict cookie and verifies
it on every request with the same verifier as the API (`ApiContext.verifier`), so a console
user is exactly the `Principal` the API would see for that token: same role, same sites, same
expiry. Nothing else is stored; signing out deletes the cookie.

Forms carry a CSRF token (double submit): a random value in its own HttpOnly, SameSite=Strict
cookie, repeated in a hidden field (htmx also sends it as `X-CSRF-Token`). A POST whose field
and cookie differ, or that comes from another origin, is refused before anything runs. Any
worker process can check it: there is no server-side secret to share.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request
from starlette.responses import Response

from continuum.application.access import NotAuthenticated, Principal
from continuum.domain.errors import ContinuumError
from continuum.entrypoints.http.deps import Ctx

SESSION_COOKIE = "continuum_console_session"
CSRF_COOKIE = "continuum_console_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
#: Cookies are sent only to the console, never to the API (which takes bearer headers only).
COOKIE_PATH = "/console"
#: A JWT larger than this is refused by the verifier anyway; browsers cap cookies at 4 KiB.
MAX_TOKEN_CHARS = 4000


class CsrfRefused(ContinuumError):
    """A console POST without a matching CSRF token, or from another origin (HTTP 403)."""

    rule = "console.csrf"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def csrf_token(request: Request) -> str:
    """The request's CSRF token: the cookie's value, or a new one (set by `remember_csrf`)."""
    existing = request.cookies.get(CSRF_COOKIE, "")
    if len(existing) == 43 and existing.replace("-", "").replace("_", "").isalnum():
        return existing
    token: str | None = getattr(request.state, "new_csrf", None)
    if token is None:
        token = secrets.token_urlsafe(32)
        request.state.new_csrf = token
    return token


def remember_csrf(request: Request, response: Response) -> None:
    """Set the CSRF cookie when this request made a new token."""
    token: str | None = getattr(request.state, "new_csrf", None)
    if token is not None:
        response.set_cookie(
            CSRF_COOKIE,
            token,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )


def check_csrf(request: Request, form: Mapping[str, str]) -> None:
    """Refuse a POST whose CSRF field (or header) does not match its cookie, or whose Origin
    is not this console's."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise CsrfRefused(
            "this form was posted from another site; open the console and try again",
            field=CSRF_FIELD,
        )
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER, "")
    if not cookie or not given or not hmac.compare_digest(cookie, given):
        raise CsrfRefused(
            "the form's security token is missing or out of date; reload the page and try again",
            field=CSRF_FIELD,
        )


def sign_in_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def sign_out_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request)
    )


def console_principal(request: Request, ctx: Ctx) -> Principal:
    """The signed-in caller, verified like an API bearer token; NotAuthenticated otherwise."""
    token = request.cookies.get(SESSION_COOKIE, "")
    if not token:
        raise NotAuthenticated("sign in to use the console", rule="access.token.missing")
    if len(token) > MAX_TOKEN_CHARS:
        raise NotAuthenticated("the session token is too large", rule="access.token.malformed")
    caller = ctx.verifier.verify(token)
    request.state.principal = caller
    return caller


ConsoleCaller = Annotated[Principal, Depends(console_principal)]


async def form_fields(request: Request) -> dict[str, str]:
    """The posted form (application/x-www-form-urlencoded), one value per field; the last one
    wins for a repeated field. Parsed here so the console needs no multipart library."""
    from urllib.parse import parse_qsl

    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=200))


Form = Annotated[dict[str, str], Depends(form_fields)]
