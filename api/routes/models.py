"""The model catalog with live queue depths and workers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from shared.schemas import ModelView

from api.auth import caller
from api.deps import service
from api.problems import documented
from api.service import JobService

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(caller)])

Service = Annotated[JobService, Depends(service)]


@router.get("/models", response_model=list[ModelView], responses=documented("unauthorized", "redis-unavailable"))
async def list_models(jobs: Service) -> list[ModelView]:
    """Every catalog model: limits, sync eligibility, queue depth, workers online, weights kind."""
    return await jobs.models()


@router.get(
    "/models/{model_id:path}",
    response_model=ModelView,
    responses=documented("unauthorized", "unknown-model", "redis-unavailable"),
)
async def get_model(model_id: str, jobs: Service) -> ModelView:
    """One model, by id (`amazon/chronos-bolt-tiny`) or slug (`chronos-bolt-tiny`)."""
    (view,) = await jobs.models((jobs.model(model_id),))
    return view
