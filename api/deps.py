"""FastAPI dependencies, each alias declared once here: routes take `Jobs` (the job service), `Models`
(the fleet of models and workers) and `IdempotencyKey` by annotation.

A route that needs the job service reads the fleet and the settings off it (`jobs.fleet`,
`jobs.settings`) rather than declaring them: FastAPI solves every declared dependency on every
request (solving took 14 % of the API's CPU under a flood of POSTs and long-wait GETs, py-spy).

The hot routes (`POST /v1/forecasts`, `GET /v1/{jobs}/{job_id}`, the predicts) declare none, nor
any query or header parameter: they take the request and call `jobs_of`, `auth.owner_of`, `query`
and `header` themselves, in that order (the key before anything else, as a declared `Caller` is
solved before the parameters are checked), and `read_by_hand` puts back into OpenAPI what the
declarations would have put there. Solving a submit's dependencies took 55 µs and a long-wait
GET's 52 µs, against 6 and 15 µs without (`solve_dependencies` alone, this 2-core CPU): ~85 µs
of the API's ~1 ms a job.

Dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency on a
worker thread, a thread hop per request for nothing (8 % of the event loop's time under a flood).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request
from pydantic import Field, TypeAdapter, ValidationError

from api import auth
from api.fleet import Fleet
from api.problems import validation_problem
from api.service import JobService

HEADER_MAX_LENGTH = 255
# The optional headers routes read, and what OpenAPI says of each.
HEADERS = {
    "Prefer": "`wait=<seconds>` (RFC 7240): answer when the job ends, or when the wait runs out.",
    "Idempotency-Key": "Any unique string: a retried request with the same key and body returns the same job.",
}


# The query parameters the hot routes read: how each is checked (as FastAPI checks a declared one),
# its default, and what OpenAPI says of it.
QUERIES: dict[str, tuple[TypeAdapter, float | None, str]] = {
    "wait": (TypeAdapter(Annotated[float, Field(ge=0)]), 0, "Seconds to wait for a terminal state (capped)."),
    "timeout": (TypeAdapter(Annotated[float, Field(gt=0)] | None), None, "Seconds to wait (capped)."),
}


def jobs_of(request: Request) -> JobService:
    return request.app.state.service


async def service(request: Request) -> JobService:
    return jobs_of(request)


async def fleet(request: Request) -> Fleet:
    return jobs_of(request).fleet


Jobs = Annotated[JobService, Depends(service)]
Models = Annotated[Fleet, Depends(fleet)]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=HEADER_MAX_LENGTH, description=HEADERS["Idempotency-Key"]),
]


def header(request: Request, name: str) -> str | None:
    """One of `HEADERS`, read by a hot route and checked as FastAPI checks a declared one: a 422
    naming it when it is too long."""
    value = request.headers.get(name)
    if value is not None and len(value) > HEADER_MAX_LENGTH:
        message = f"String should have at most {HEADER_MAX_LENGTH} characters"
        raise validation_problem([{"loc": ("header", name), "msg": message}])
    return value


def query(request: Request, name: str) -> Any:
    """One of `QUERIES`, read by a hot route after its key check: declared, FastAPI would check it
    before the route's body runs, and a keyless call with a bad value would get 422, not 401."""
    adapter, default, _ = QUERIES[name]
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise validation_problem([{**e, "loc": ("query", name, *e["loc"])} for e in exc.errors()]) from None


def read_by_hand(*names: str) -> dict[str, Any]:
    """The `openapi_extra` of a hot route: the key's security requirement and the query parameters
    and headers it reads with `query` and `header`, as FastAPI documents a `Caller` and declared
    parameters (tests/test_openapi.py compares them)."""
    parameters = []
    for name in names:
        if name in QUERIES:
            adapter, default, doc = QUERIES[name]
            schema = {**adapter.json_schema(), "description": doc, "title": name.title()}
            if default is not None:
                schema["default"] = default
            parameters.append({"name": name, "in": "query", "required": False, "schema": schema, "description": doc})
            continue
        schema = {
            "anyOf": [{"type": "string", "maxLength": HEADER_MAX_LENGTH}, {"type": "null"}],
            "description": HEADERS[name],
            "title": name,
        }
        parameters.append(
            {"name": name, "in": "header", "required": False, "schema": schema, "description": HEADERS[name]}
        )
    return {"security": auth.SECURITY, "parameters": parameters}
