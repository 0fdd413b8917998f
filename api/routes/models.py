"""The model catalog with live queue depths and workers."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response, status

from shared import model_store
from shared.schemas import ModelView, VersionView

from api.auth import Caller, caller
from api.deps import Jobs, Models
from api.problems import Problem, documented

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(caller)])


@router.get(
    "/models",
    response_model=list[ModelView],
    responses=documented("unauthorized", "missing-scope", "redis-unavailable"),
)
async def list_models(models: Models, owner: Caller) -> list[ModelView]:
    """Every catalog model: limits, sync eligibility, queue depth, workers online, weights kind, circuit;
    then the configured ensembles (family `ensemble`, with their members), and the caller's
    fine-tuned models (`base_model`, `finetune`), served by their base model's workers."""
    return [*await models.models(ensembles=True), *await models.finetuned_views(await models.owned(owner))]


@router.get(
    "/models/{model_id:path}/versions",
    response_model=list[VersionView],
    responses=documented("unauthorized", "missing-scope", "unknown-model", "redis-unavailable"),
)
async def model_versions(model_id: str, models: Models) -> list[VersionView]:
    """The weights revisions the model's workers serve or served, oldest first: which are active (a
    live worker serves them), on how many workers, and since when. `parameters.weights_revision`
    pins a request to one."""
    return await models.versions(models.model(model_id))


@router.get(
    "/models/{model_id:path}",
    response_model=ModelView,
    responses=documented("unauthorized", "missing-scope", "unknown-model", "redis-unavailable"),
)
async def get_model(model_id: str, models: Models, owner: Caller) -> ModelView:
    """One model, by id (`amazon/chronos-bolt-tiny`) or slug (`chronos-bolt-tiny`), or one of the
    caller's fine-tuned models by id."""
    if model_store.is_finetuned(model_id):
        (view,) = await models.finetuned_views([await models.finetuned(model_id, owner)])
        return view
    (view,) = await models.models((models.model(model_id),))
    return view


@router.delete(
    "/models/{model_id:path}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=documented("unauthorized", "unknown-model", "not-deletable", "redis-unavailable"),
)
async def delete_model(model_id: str, jobs: Jobs, owner: Caller) -> Response:
    """Delete one of the caller's fine-tuned models: it is unlisted and refused at once, and its
    weights are removed from the model store. Catalog models cannot be deleted (405)."""
    if not model_store.is_finetuned(model_id):
        jobs.fleet.model(model_id)  # an unknown name is 404, a catalog model 405
        raise Problem(405, "not-deletable", f"{model_id} is a catalog model; only fine-tuned models are deleted")
    manifest = await jobs.fleet.finetuned(model_id, owner)
    await jobs.store.forget_finetuned(manifest["id"])
    model_store.delete(jobs.settings.model_store, manifest["id"])
    return Response(status_code=status.HTTP_204_NO_CONTENT)
