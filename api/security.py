"""Response headers every answer carries, the request id, and CORS (off unless configured).

The request id comes from the client's `X-Request-Id` (when it is a plain token of up to 64
characters) or is made here; it is echoed in the response and added to every log line written
while the request is handled, next to the job id the service logs. Series values are never logged.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers, MutableHeaders

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_TOKEN = re.compile(rb"^(?=[._-]*[A-Za-z0-9])[A-Za-z0-9._-]{1,64}$")  # not "-" alone: the logs' "no request"
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def new_id() -> str:
    """A request id made here: 32 random hex digits, as a uuid4's hex, for a fifth of its cost (1 µs against 5)."""
    return os.urandom(16).hex()


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (for the format's `%(request_id)s`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class SecurityHeaders:
    """ASGI middleware: the request id, and the standard headers on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given.decode() if _TOKEN.match(given) else new_id()
        token = request_id.set(rid)
        # For an unhandled error's 500, answered outside this middleware (`error_headers`).
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS, (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            request_id.reset(token)


def error_headers(scope) -> tuple[str, dict[str, str]]:
    """The request id and the headers for a 500 answered by Starlette's ServerErrorMiddleware, which
    sits outside every middleware of the app (this one and CORS's included) and so gets none of
    them: without CORS's, a browser would hide the 500 (its request id too) behind a CORS error."""
    rid = scope.get("state", {}).get("request_id") or new_id()  # failed before this middleware ran: a new one
    headers = {**{name.decode(): value.decode() for name, value in _HEADERS}, "X-Request-Id": rid}
    cors: CORSMiddleware | None = getattr(scope["app"].state, "cors", None) if "app" in scope else None
    if cors is not None:
        # What CORSMiddleware.send adds to a simple response, by its own rules and helpers.
        origin = Headers(scope=scope).get("origin")
        added = MutableHeaders(headers=dict(cors.simple_headers) if origin is not None else {})
        if origin is not None and cors.allow_all_origins and cors.allow_credentials:
            cors.allow_explicit_origin(added, origin)
        elif origin is not None and not cors.allow_all_origins and cors.is_allowed_origin(origin=origin):
            cors.allow_explicit_origin(added, origin)
        else:
            added["Vary"] = "Origin"
        headers.update(added.items())
    return rid, headers


def install(app: FastAPI, cors_origins: list[str]) -> None:
    app.state.cors = None
    if cors_origins:
        options: dict[str, Any] = {
            "allow_origins": cors_origins,
            "allow_methods": ["GET", "POST", "DELETE"],
            "allow_headers": ["Content-Type", "X-API-Key", "Authorization", "Idempotency-Key", "X-Request-Id"],
            "expose_headers": ["Location", "Retry-After", "X-Request-Id", "X-Job-Id", "Idempotent-Replayed"],
        }
        app.add_middleware(CORSMiddleware, **options)
        # Its rules, for the 500s answered outside it (`error_headers`); never called as middleware.
        app.state.cors = CORSMiddleware(app, **options)
    app.add_middleware(SecurityHeaders)
