"""RFC 9457 problem details: every error the API returns is `application/problem+json`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis.exceptions as redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import security
from api.compat import legacy_path

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
        headers: Mapping[str, str] | None = None,
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
            if legacy_path(instance):
                body["error"] = self.detail  # where the old server put its message (an extension member)
        if self.field:
            body["field"] = self.field
        body.update(self.extra)
        return JSONResponse(body, status_code=self.status, headers=self.headers, media_type=MEDIA_TYPE)


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    408: "Request Timeout",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
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
    """Answer every error as problem+json, and document it so in the OpenAPI schema."""
    _document_validation_errors(app)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return Problem(400, "malformed-json", "the request body is not valid JSON").response(request.url.path)
        return validation_problem(errors).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return Problem(exc.status_code, code, str(exc.detail), headers=exc.headers).response(request.url.path)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_away(request: Request, exc: Exception):
        # Redis is the job store: without it nothing can be accepted or read. Say so and when to retry;
        # the client's connection pool reconnects by itself once Redis is back.
        log.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, exc)
        return Problem(
            503, "redis-unavailable", "the job store (Redis) is not reachable; retry", headers={"Retry-After": "1"}
        ).response(request.url.path)

    @app.exception_handler(redis.ResponseError)
    async def _redis_refused(request: Request, exc: Exception):
        # At `maxmemory` Redis refuses writes with an OOM error: a capacity problem to come back from,
        # not a bug. Nothing was accepted (each write that takes a job is one script).
        if isinstance(exc, redis.OutOfMemoryError) or str(exc).startswith("OOM"):
            log.warning("Redis out of memory on %s %s: %s", request.method, request.url.path, exc)
            return Problem(
                503, "redis-unavailable", "the job store (Redis) is out of memory; retry later",
                headers={"Retry-After": "5"},
            ).response(request.url.path)  # fmt: skip
        return _internal_error(request, outside=False)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Run by ServerErrorMiddleware (Starlette hands it no other exception), outside every
        # middleware of the app.
        return _internal_error(request, outside=True)


def _internal_error(request: Request, outside: bool) -> JSONResponse:
    """A 500 for a bug: logged with its stack trace under the request id, which the answer gives
    (`X-Request-Id` and `detail`), so that a client can quote it and the line be found. `outside`
    the middleware that sets the id and the standard headers, they are set here."""
    rid, headers = security.error_headers(request.scope)
    token = security.request_id.set(rid) if outside else None
    try:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
    finally:
        if token is not None:
            security.request_id.reset(token)
    detail = f"internal error; see the server log (request {rid})"
    return Problem(500, "internal-error", detail, headers=headers if outside else None).response(request.url.path)


def validation_problem(errors: Sequence[Mapping[str, Any]], prefix: str = "") -> Problem:
    """A 422 naming the first invalid field (pydantic error list; `prefix` is where the model sits in the body)."""
    items = []
    for e in errors:
        path = field_path(e["loc"])
        field = f"{prefix}.{path}" if prefix and path else (prefix or path)
        items.append({"field": field, "message": _message(e)})
    first = items[0]
    detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    if len(items) > 1:
        detail += f" (and {len(items) - 1} more)"
    return Problem(422, "validation-error", detail, field=first["field"], errors=items[:20])


def _message(error: Mapping[str, Any]) -> str:
    msg = error.get("msg", "invalid value")
    return msg.removeprefix("Value error, ")


class ProblemDetails(BaseModel):
    """RFC 9457 problem details, as every error of this API is answered."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="urn:chronos-queue:problem:<code>")
    title: str
    status: int
    code: str = Field(description="Stable machine-readable code.")
    detail: str = Field(description="What went wrong, for humans.")
    instance: str | None = Field(None, description="The request path.")
    field: str | None = Field(None, description="The offending request field, for validation errors.")


# One example per problem code the API can answer: status, detail, extra members.
EXAMPLES: dict[str, tuple[int, str, dict[str, Any]]] = {
    "malformed-json": (400, "the request body is not valid JSON", {}),
    "unauthorized": (401, "missing API key: send it as `X-API-Key: KEY` or `Authorization: Bearer KEY`", {}),
    "missing-scope": (403, "scope 'forecast' required; this key has read", {"scope": "forecast"}),
    "model-not-allowed": (403, "model 'amazon/chronos-bolt-base' not allowed for this key", {"field": "model"}),
    "unknown-model": (404, "unknown model 'amazon/chronos-t5-huge'; GET /v1/models lists them", {"field": "model"}),
    "unknown-job": (404, "no job '3f2a…' (never accepted, or its result expired)", {}),
    "not-sync-eligible": (
        409, "amazon/chronos-t5-large is not served synchronously; submit it with POST /v1/forecasts and poll",
        {"field": "model", "async_endpoint": "/v1/forecasts"},
    ),
    "job-finished": (409, "job 3f2a… already succeeded; nothing to cancel", {"status_now": "succeeded"}),
    "job-cancelled": (409, "job 3f2a… was cancelled", {"job_id": "3f2a…"}),
    "other-model": (
        409,
        "this URL serves amazon/chronos-t5-tiny; "
        "for amazon/chronos-bolt-base use /models/<slug>/forecast/v1/chronos/...",
        {"field": "model_variant"},
    ),
    "not-deletable": (405, "amazon/chronos-2 is a catalog model; only fine-tuned models are deleted", {}),
    "rate-limited": (429, "over 200 submissions/s for this key (burst 400)", {}),
    "too-many-in-flight": (
        429, "10000 jobs not yet finished for this key (MAX_IN_FLIGHT 10000); wait for some to finish", {}
    ),
    "queue-full": (503, "queue chronos-bolt-small holds 100000 jobs or more; retry later", {}),
    "idempotency-key-reused": (
        422, "this Idempotency-Key was used with a different request; use a new key for a new request",
        {"field": "Idempotency-Key", "job_id": "3f2a…"},
    ),
    "body-too-large": (413, "request body over 67108864 bytes (MAX_BODY_BYTES)", {}),
    "body-timeout": (408, "the request body did not arrive within 30s", {}),
    "unsupported-media-type": (
        415,
        "bodies are application/json, application/vnd.apache.arrow.stream or application/vnd.apache.parquet, "
        "not text/csv",
        {},
    ),
    "malformed-body": (400, "not a readable application/vnd.apache.arrow.stream body: …", {}),
    "validation-error": (
        422, "inputs[0].target: holds an infinite value; use null or NaN for missing values",
        {"field": "inputs[0].target", "errors": [
            {"field": "inputs[0].target", "message": "holds an infinite value; use null or NaN for missing values"}
        ]},
    ),
    "limit-exceeded": (
        422, "parameters.prediction_length: 2048 steps; at most 1024", {"field": "parameters.prediction_length"}
    ),
    "not-sample-based": (
        422,
        "parameters.temperature: amazon/chronos-bolt-small outputs quantiles directly; "
        "sampling options apply to T5 models only",
        {"field": "parameters.temperature"},
    ),
    "unsupported-input": (
        422, "inputs[0].past_covariates: amazon/chronos-bolt-small takes no covariates; amazon/chronos-2 does",
        {"field": "inputs[0].past_covariates"},
    ),
    "callback-not-allowed": (
        422, "callback_url: not under an allowed prefix (https://hooks.example.com/chronos/)", {"field": "callback_url"}
    ),
    "forecast-failed": (500, "RuntimeError: CUDA out of memory", {"job_id": "3f2a…"}),
    "internal-error": (500, "internal error; see the server log", {}),
    "no-worker": (
        503,
        "no worker is serving amazon/chronos-bolt-tiny right now; POST /v1/forecasts queues the job until one starts",
        {},
    ),
    "model-unavailable": (
        503,
        "too many of amazon/chronos-bolt-tiny's recent jobs failed; its circuit is open, calls are refused for up "
        "to 30s (POST /v1/forecasts still queues jobs)",
        {},
    ),
    "broker-unavailable": (503, "could not enqueue the job; retry", {}),
    "redis-unavailable": (503, "the job store (Redis) is not reachable; retry", {}),
    "forecast-timeout": (
        504, "no forecast within 290s; the job continues: GET /v1/forecasts/3f2a…", {"job_id": "3f2a…"}
    ),
}  # fmt: skip

# The errors every route with a JSON body can answer before it runs.
BODY_ERRORS = ("malformed-json", "body-too-large", "body-timeout", "validation-error")
# The errors of routes that also take Arrow or Parquet bodies.
COLUMNAR_ERRORS = ("unsupported-media-type", "malformed-body")
# What a job submission can be refused with (`no-worker`, `model-unavailable`: on any route when
# the job pins a weights revision no live worker serves, or goes down a fallback chain).
SUBMIT_ERRORS = (*BODY_ERRORS, *COLUMNAR_ERRORS, "unauthorized", "missing-scope", "model-not-allowed",
                 "unknown-model", "limit-exceeded", "not-sample-based", "unsupported-input", "broker-unavailable",
                 "redis-unavailable", "rate-limited", "too-many-in-flight", "queue-full", "idempotency-key-reused",
                 "callback-not-allowed", "no-worker", "model-unavailable")  # fmt: skip


def documented(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these problem codes: grouped by status, one named example each."""
    schema = ProblemDetails.model_json_schema()
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        status, detail, extra = EXAMPLES[code]
        title = _TITLES.get(status, "Error")
        entry = out.setdefault(
            status, {"description": title, "content": {MEDIA_TYPE: {"schema": schema, "examples": {}}}}
        )
        example = {"type": f"urn:chronos-queue:problem:{code}", "title": title, "status": status, "code": code,
                   "detail": detail, **extra}  # fmt: skip
        entry["content"][MEDIA_TYPE]["examples"][code] = {"summary": code, "value": example}
    return out


def _document_validation_errors(app: FastAPI) -> None:
    """FastAPI documents request validation as its own 422 JSON shape; ours is problem+json."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        ours = documented("validation-error")[422]
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            if "application/json" in operation.get("responses", {}).get("422", {}).get("content", {}):
                operation["responses"]["422"] = ours
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI documents replacing app.openapi; typed as a method
