"""FastAPI dependencies, each alias declared once here: routes take `Jobs` (the job service), `Models`
(the fleet of models and workers) and `IdempotencyKey` by annotation.

A route that needs the job service reads the fleet and the settings off it (`jobs.fleet`,
`jobs.settings`) rather than declaring them: FastAPI solves every declared dependency on every
request (solving took 14 % of the API's CPU under a flood of POSTs and long-wait GETs, py-spy).

Dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency on a
worker thread, a thread hop per request for nothing (8 % of the event loop's time under a flood).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from api.fleet import Fleet
from api.service import JobService


async def service(request: Request) -> JobService:
    return request.app.state.service


async def fleet(request: Request) -> Fleet:
    return request.app.state.service.fleet


Jobs = Annotated[JobService, Depends(service)]
Models = Annotated[Fleet, Depends(fleet)]
PreferHeader = Annotated[
    str | None,
    Header(
        alias="Prefer",
        max_length=255,
        description="`wait=<seconds>` (RFC 7240): answer when the job ends, or when the wait runs out.",
    ),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Any unique string: a retried request with the same key and body returns the same job.",
    ),
]
