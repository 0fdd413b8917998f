"""FastAPI dependencies, each alias declared once here: routes take `Jobs`, `Models` (the fleet of
models and workers), `Config` and `IdempotencyKey` by annotation.

Dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency on a
worker thread, a thread hop per request for nothing (8 % of the event loop's time under a flood).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from shared.settings import Settings

from api.fleet import Fleet
from api.service import JobService


async def service(request: Request) -> JobService:
    return request.app.state.service


async def fleet(request: Request) -> Fleet:
    return request.app.state.service.fleet


async def settings(request: Request) -> Settings:
    return request.app.state.service.settings


Jobs = Annotated[JobService, Depends(service)]
Models = Annotated[Fleet, Depends(fleet)]
Config = Annotated[Settings, Depends(settings)]
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
