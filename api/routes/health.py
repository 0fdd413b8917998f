"""Liveness and readiness probes, and the Prometheus endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import Jobs, Models
from api.problems import Problem, documented

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses=documented("redis-unavailable"))
async def readyz(jobs: Jobs) -> dict:
    """Redis is reachable (503 otherwise)."""
    if not await jobs.ready():
        raise Problem(
            503, "redis-unavailable", "the job store (Redis) is not reachable; retry", headers={"Retry-After": "1"}
        )
    return {"status": "ready"}


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request, models: Models) -> Response:
    """Prometheus metrics: request latency by route and status, jobs accepted, queue depth, workers online."""
    body, content_type = request.app.state.metrics.render(await models.models())
    return Response(body, media_type=content_type)
