"""Request dependencies: the caller, why it reads, and the concurrency headers."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, get_origin

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from continuum.application.access import NotAuthenticated, Principal, PurposeOfUse
from continuum.entrypoints.http.context import ApiContext
from continuum.entrypoints.http.problems import HeaderProblem
from continuum.entrypoints.http.threads import in_thread

_bearer = HTTPBearer(auto_error=False, description="A JWT from the configured OIDC issuer.")

#: The patterns of continuum_events.codes, for query parameters.
KEY_PATTERN = r"^pk-[a-z2-7]{20}$"
CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$"
LEVEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,23}$"

_ETAG = re.compile(r'^(?:W/)?"?(\d{1,9})"?$')
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")


# Dependencies are `async`: FastAPI runs a plain `def` dependency in its thread pool, and those
# hops (a queue, a thread wake-up, the GIL handed back and forth) cost more than the work.
# `principal` answers from the verifier's cache in line, and goes to the pool only when
# verifying may fetch the issuer's keys over the network.


async def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(context)]


async def principal(
    request: Request,
    ctx: Ctx,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise NotAuthenticated(
            "this endpoint needs a bearer token (Authorization: Bearer <JWT>)",
            rule="access.token.missing",
            field="Authorization",
        )
    token = credentials.credentials
    caller = ctx.verifier.cached(token)
    if caller is None:
        caller = await in_thread(ctx.verifier.verify, token)
    request.state.principal = caller
    return caller


Caller = Annotated[Principal, Depends(principal)]


async def purpose(
    x_purpose_of_use: Annotated[
        PurposeOfUse | None,
        Header(description="Why the data is read (HL7 PurposeOfUse); a default per role."),
    ] = None,
) -> PurposeOfUse | None:
    return x_purpose_of_use


Purpose = Annotated[PurposeOfUse | None, Depends(purpose)]


async def expected_version(
    if_match: Annotated[
        str | None,
        Header(description='The patient version the change is based on: the ETag, e.g. "3".'),
    ] = None,
) -> int | None:
    if if_match is None:
        return None
    found = _ETAG.match(if_match.strip())
    if found is None:
        raise HeaderProblem(
            f'If-Match must be the patient ETag (a version such as "3"); got {if_match[:40]!r}',
            field="If-Match",
        )
    return int(found.group(1))


ExpectedVersion = Annotated[int | None, Depends(expected_version)]


async def idempotency_key(
    caller: Caller,
    idempotency_key: Annotated[
        str | None,
        Header(description="Makes a retried POST safe: the same key returns the first result."),
    ] = None,
) -> str | None:
    if idempotency_key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise HeaderProblem(
            "Idempotency-Key must be 1-100 characters of letters, digits and . _ : -",
            field="Idempotency-Key",
        )
    # Keys are scoped to the caller: two clients can never collide on a key.
    scope = hashlib.sha256(caller.subject.encode("utf-8")).hexdigest()[:16]
    return f"{scope}:{idempotency_key}"


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]


def etag(version: int) -> str:
    return f'"{version}"'


class QueryProblem(Exception):
    """An undeclared or repeated query parameter (answered as a 422)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


_QUERY_NAMES: dict[int, tuple[frozenset[str], frozenset[str]]] = {}


def _query_names(dependant: Any) -> tuple[set[str], set[str]]:
    """(every query parameter the route declares, those that take several values)."""
    names: set[str] = set()
    lists: set[str] = set()
    for param in dependant.query_params:
        names.add(param.alias)
        if get_origin(param.field_info.annotation) is list:
            lists.add(param.alias)
    for sub in dependant.dependencies:
        more, more_lists = _query_names(sub)
        names |= more
        lists |= more_lists
    return names, lists


async def strict_query(request: Request) -> None:
    """Refuse query parameters a route does not declare, and a scalar one given twice: a typo
    (`?flaged=true`) must not silently return everything."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    known = _QUERY_NAMES.get(id(route))
    if known is None:
        found, found_lists = _query_names(dependant)
        known = _QUERY_NAMES[id(route)] = (frozenset(found), frozenset(found_lists))
    declared, multi = known
    for name in request.query_params:
        if name not in declared:
            allowed = ", ".join(sorted(declared)) or "none"
            raise QueryProblem(f"query.{name}"[:80], f"unknown query parameter; allowed: {allowed}")
        if name not in multi and len(request.query_params.getlist(name)) > 1:
            raise QueryProblem(f"query.{name}", "given more than once")
