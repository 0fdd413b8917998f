"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api.deps import service
from api.problems import Problem
from api.service import JobService

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(jobs: Annotated[JobService, Depends(service)]) -> dict:
    """Redis is reachable (503 otherwise)."""
    if not await jobs.ready():
        raise Problem(503, "redis-unavailable", "Redis is not reachable", headers={"Retry-After": "1"})
    return {"status": "ready"}
