"""FastAPI dependencies: the process-wide service and settings.

Dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency on a
worker thread, a thread hop per request for nothing (8 % of the event loop's time under a flood).
"""

from __future__ import annotations

from fastapi import Request

from shared.settings import Settings

from api.service import JobService


async def service(request: Request) -> JobService:
    return request.app.state.service


async def settings(request: Request) -> Settings:
    return request.app.state.service.settings
