"""Request guards that run before any route: request id, body size, content type.

Pure ASGI (no BaseHTTPMiddleware), so streamed responses such as the log export pass through
untouched."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from continuum.entrypoints.http.problems import PROBLEM_JSON, TITLES, TYPE_BASE

_REQUEST_ID = re.compile(r"^[A-Za-z0-9\-]{1,64}$")
_JSON = re.compile(r"^application/(?:[a-z0-9.+\-]+\+)?json$")
_WITH_BODY = {"POST", "PUT", "PATCH"}
_FORM = "application/x-www-form-urlencoded"


class RequestGuard:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, form_paths: tuple[str, ...] = ()
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        #: Path prefixes whose POSTs may be HTML forms (the web console); the API takes JSON.
        self.form_paths = form_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        if scope["method"] in _WITH_BODY:
            declared = headers.get("content-length")
            if declared is not None and (
                not declared.isdigit() or int(declared) > self.max_body_bytes
            ):
                await self._reject(
                    scope,
                    send_with_id,
                    status=413,
                    rule="http.body_too_large",
                    detail=f"the body exceeds {self.max_body_bytes} bytes",
                )
                return
            body, too_large = await self._read(receive)
            if too_large:
                await self._reject(
                    scope,
                    send_with_id,
                    status=413,
                    rule="http.body_too_large",
                    detail=f"the body exceeds {self.max_body_bytes} bytes",
                )
                return
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            is_form = media == _FORM and str(scope.get("path", "")).startswith(self.form_paths)
            if body and not _JSON.match(media) and not is_form:
                await self._reject(
                    scope,
                    send_with_id,
                    status=415,
                    rule="http.unsupported_media_type",
                    detail="send the body as application/json "
                    f"(got {media[:60] or 'no content type'})",
                    field="Content-Type",
                )
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_with_id)
            return
        await self.app(scope, receive, send_with_id)

    async def _read(self, receive: Receive) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False

    async def _reject(
        self,
        scope: Scope,
        send: Send,
        *,
        status: int,
        rule: str,
        detail: str,
        field: str | None = None,
    ) -> None:
        problem: dict[str, Any] = {
            "type": TYPE_BASE + rule,
            "title": TITLES.get(status, "Error"),
            "status": status,
            "detail": detail,
            "instance": scope.get("path", ""),
            "rule": rule,
            "request_id": scope["state"]["request_id"],
        }
        if field:
            problem["field"] = field
        payload = json.dumps(problem).encode("utf-8")
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
