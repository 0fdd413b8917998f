"""FastAPI dependencies, each alias declared once here: routes take `Jobs` (the job service), `Models`
(the fleet of models and workers) and `IdempotencyKey` by annotation.

A route that needs the job service reads the fleet and the settings off it (`jobs.fleet`,
`jobs.settings`) rather than declaring them: FastAPI solves every declared dependency on every
request (solving took 14 % of the API's CPU under a flood of POSTs and long-wait GETs, py-spy).

The hot routes (`POST /v1/forecasts`, `GET /v1/{jobs}/{job_id}`, the predicts) declare none, nor
any query or header parameter: they take the request and call `jobs_of`, `auth.owner_of` and `read`
themselves, in that order (the key before anything else, as a declared `Caller` is
solved before the parameters are checked), and `read_by_hand` puts back into OpenAPI what the
declarations would have put there. Solving a submit's dependencies took 55 µs and a long-wait
GET's 52 µs, against 6 and 15 µs without (`solve_dependencies` alone, this 2-core CPU): ~85 µs
of the API's ~1 ms a job.

Dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency on a
worker thread, a thread hop per request for nothing (8 % of the event loop's time under a flood).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from pydantic import Field, TypeAdapter, ValidationError

from api import auth
from api.fleet import Fleet
from api.problems import validation_problem
from api.service import JobService

HEADER_MAX_LENGTH = 255


@dataclass(frozen=True)
class Parameter:
    """A query parameter or header a hot route reads by hand (`read`): where it comes from, how it
    is checked (as FastAPI checks a declared one, with the same messages), its default, its docs."""

    where: str  # "query" or "header"
    check: TypeAdapter
    default: Any
    doc: str


_HEADER = TypeAdapter(Annotated[str, Field(max_length=HEADER_MAX_LENGTH)] | None)
PARAMETERS = {
    "wait": Parameter(
        "query", TypeAdapter(Annotated[float, Field(ge=0)]), 0, "Seconds to wait for a terminal state (capped)."
    ),
    "timeout": Parameter("query", TypeAdapter(Annotated[float, Field(gt=0)] | None), None, "Seconds to wait (capped)."),
    "Prefer": Parameter(
        "header", _HEADER, None, "`wait=<seconds>` (RFC 7240): answer when the job ends, or when the wait runs out."
    ),
    "Idempotency-Key": Parameter(
        "header", _HEADER, None, "Any unique string: a retried request with the same key and body returns the same job."
    ),
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
    Header(alias="Idempotency-Key", max_length=HEADER_MAX_LENGTH, description=PARAMETERS["Idempotency-Key"].doc),
]


def read(request: Request, name: str) -> Any:
    """One of `PARAMETERS`, read by a hot route after its key check: declared, FastAPI would check
    it before the route's body runs, and a keyless call with a bad value would get 422, not 401."""
    parameter = PARAMETERS[name]
    value = (request.query_params if parameter.where == "query" else request.headers).get(name)
    if value is None:
        return parameter.default
    try:
        return parameter.check.validate_python(value)
    except ValidationError as exc:
        raise validation_problem([{**e, "loc": (parameter.where, name, *e["loc"])} for e in exc.errors()]) from None


def read_by_hand(*names: str) -> dict[str, Any]:
    """The `openapi_extra` of a hot route: the key's security requirement and the parameters it
    reads with `read`, as FastAPI documents a `Caller` and declared parameters
    (tests/test_openapi.py compares them)."""
    parameters = []
    for name in names:
        p = PARAMETERS[name]
        schema = {**p.check.json_schema(), "description": p.doc, "title": name.title()}
        if p.default is not None:
            schema["default"] = p.default
        parameters.append({"name": name, "in": p.where, "required": False, "schema": schema, "description": p.doc})
    return {"security": auth.SECURITY, "parameters": parameters}
