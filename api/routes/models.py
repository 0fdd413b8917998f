"""The model catalog with live queue depths and workers."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from shared.schemas import ModelView, VersionView

from api.auth import caller
from api.deps import Models
from api.problems import documented

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(caller)])


@router.get("/models", response_model=list[ModelView], responses=documented("unauthorized", "redis-unavailable"))
async def list_models(models: Models) -> list[ModelView]:
    """Every catalog model: limits, sync eligibility, queue depth, workers online, weights kind, circuit;
    then the configured ensembles (family `ensemble`, with their members)."""
    return await models.models(ensembles=True)


@router.get(
    "/models/{model_id:path}/versions",
    response_model=list[VersionView],
    responses=documented("unauthorized", "unknown-model", "redis-unavailable"),
)
async def model_versions(model_id: str, models: Models) -> list[VersionView]:
    """The weights revisions the model's workers serve or served, oldest first: which are active (a
    live worker serves them), on how many workers, and since when. `parameters.weights_revision`
    pins a request to one."""
    return await models.versions(models.model(model_id))


@router.get(
    "/models/{model_id:path}",
    response_model=ModelView,
    responses=documented("unauthorized", "unknown-model", "redis-unavailable"),
)
async def get_model(model_id: str, models: Models) -> ModelView:
    """One model, by id (`amazon/chronos-bolt-tiny`) or slug (`chronos-bolt-tiny`)."""
    (view,) = await models.models((models.model(model_id),))
    return view
