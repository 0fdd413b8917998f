"""RFC 9457 problem details: every error the API returns is `application/problem+json`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An error response. `code` is stable and forms the problem `type`; `detail` is for humans."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.field, self.headers, self.extra = field, headers or {}, extra

    def response(self, instance: str | None = None) -> JSONResponse:
        body: dict[str, Any] = {
            "type": f"urn:chronos-queue:problem:{self.code}",
            "title": _TITLES.get(self.status, "Error"),
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.field:
            body["field"] = self.field
        body.update(self.extra)
        return JSONResponse(body, status_code=self.status, headers=self.headers, media_type=MEDIA_TYPE)


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


def field_path(loc: tuple | list) -> str:
    """('body', 'inputs', 0, 'target') -> 'inputs[0].target'."""
    path = ""
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "float", "int", "none", "list[")):
            path += f".{part}" if path else str(part)
    return path


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return Problem(400, "malformed-json", "the request body is not valid JSON").response(request.url.path)
        items = [{"field": field_path(e["loc"]), "message": _message(e)} for e in errors]
        first = items[0]
        detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
        if len(items) > 1:
            detail += f" (and {len(items) - 1} more)"
        return Problem(422, "validation-error", detail, field=first["field"], errors=items[:20]).response(
            request.url.path
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return Problem(exc.status_code, code, str(exc.detail), headers=exc.headers).response(request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Problem(500, "internal-error", "internal error; see the server log").response(request.url.path)


def _message(error: dict) -> str:
    msg = error.get("msg", "invalid value")
    return msg.removeprefix("Value error, ")
