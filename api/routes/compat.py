"""Drop-in routes of the per-model Chronos server (docs/api.md, compat routes), served twice: un-prefixed, for the
configured default model (COMPAT_MODEL; `/v1/timeseries/forecast` takes the body's model), and
under `/models/{slug}`, one base URL per model standing in for one old container.

No `from __future__ import annotations` here: FastAPI must resolve the per-router `Model` aliases
defined inside `build` at import time.
"""

import math
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from shared import catalog
from shared.schemas import ForecastRequest
from shared.store import JobStatus, Lane

from api import bodies, compat
from api.auth import LegacyCaller, permit_model
from api.deps import Jobs
from api.problems import BODY_ERRORS, Problem, documented
from api.service import JobService


async def _default_model(jobs: Jobs) -> catalog.ModelSpec:
    return catalog.get(jobs.settings.compat_model)


async def _path_model(
    slug: Annotated[str, Path(description="Model slug (chronos-t5-tiny) or id, as in GET /v1/models.")], jobs: Jobs
) -> catalog.ModelSpec:
    return jobs.fleet.model(slug)


async def _no_model() -> None:
    return None


def build(
    prefix: str,
    model_of: Callable[..., Awaitable[catalog.ModelSpec]],
    timeseries_model_of: Callable[..., Awaitable[catalog.ModelSpec | None]],
) -> APIRouter:
    """The compat routes under `prefix`, serving the model that the dependency `model_of` names;
    `/v1/timeseries/forecast` serves `timeseries_model_of`'s, or the body's when that is None."""
    router = APIRouter(prefix=prefix, tags=["compatibility"])
    Model = Annotated[catalog.ModelSpec, Depends(model_of)]
    TimeseriesModel = Annotated[catalog.ModelSpec | None, Depends(timeseries_model_of)]

    # Under /models/{slug}, an unknown slug is a 404 on every route.
    url_errors = ("unknown-model",) if "{slug}" in prefix else ()
    run_errors = (*BODY_ERRORS, *url_errors, "unauthorized", "missing-scope", "model-not-allowed", "limit-exceeded",
                  "unsupported-input", "no-worker", "broker-unavailable", "redis-unavailable", "forecast-failed",
                  "job-cancelled", "forecast-timeout", "rate-limited", "too-many-in-flight", "queue-full")  # fmt: skip

    @router.get("/health", response_model=compat.HealthResponse, responses=documented(*url_errors))
    async def health(spec: Model, jobs: Jobs) -> compat.HealthResponse:
        """Liveness, as the old server answered it (no key needed), and the model this URL serves."""
        (view,) = await jobs.fleet.models((spec,))
        return compat.health(view)

    # Bodies are read in the routes, after the caller was checked (api/bodies.py): a body FastAPI
    # declared would be parsed before any dependency runs, key or no key.
    @router.post(
        "/forecast/v1/chronos/initialization",
        response_model=compat.InitializationResponse,
        responses=documented(*BODY_ERRORS, *url_errors, "unauthorized", "missing-scope", "other-model", "no-worker"),
        openapi_extra=bodies.documented_body(compat.InitializationRequest, required=False),
    )
    async def initialization(
        request: Request, spec: Model, jobs: Jobs, _: LegacyCaller
    ) -> compat.InitializationResponse:
        """Workers load their model when they start; this waits (COMPAT_INIT_WAIT_S) until one serves it."""
        body = await bodies.model_body(request, jobs.settings, compat.InitializationRequest, optional=True)
        if body and body.model_variant and catalog.find(body.model_variant) is not spec:
            raise Problem(
                409,
                "other-model",
                f"this URL serves {spec.id}; for {body.model_variant} use /models/<slug>/forecast/v1/chronos/...",
                field="model_variant",
            )
        await jobs.fleet.serving(spec, jobs.settings.compat_init_wait_s)
        (view,) = await jobs.fleet.models((spec,))
        return compat.InitializationResponse(
            message="Model initialized successfully", model_status="ready", model_info=compat.model_info(view)
        )

    @router.get(
        "/forecast/v1/chronos/status",
        response_model=compat.StatusResponse,
        responses=documented(*url_errors, "unauthorized", "missing-scope"),
    )
    async def chronos_status(spec: Model, jobs: Jobs, _: LegacyCaller) -> compat.StatusResponse:
        """ready while a worker serves the model; uninitialized while none does."""
        (view,) = await jobs.fleet.models((spec,))
        return compat.status(view)

    @router.post(
        "/forecast/v1/chronos/inference",
        response_model=compat.InferenceResponse,
        responses=documented(*run_errors),
        openapi_extra=bodies.documented_body(compat.InferenceRequest),
    )
    async def inference(
        request: Request, spec: Model, jobs: Jobs, owner: LegacyCaller, response: Response
    ) -> compat.InferenceResponse:
        """One forecast: median, mean, deciles, and sample paths (T5; empty for Bolt)."""
        permit_model(request, spec.id)
        body = await bodies.model_body(request, jobs.settings, compat.InferenceRequest)
        record = await _run(jobs, compat.inference_request(spec, body), owner, response)
        return compat.inference_response(record, body)

    @router.post(
        "/v1/timeseries/forecast",
        response_model=compat.TimeseriesResponse,
        responses=documented(*run_errors, *([] if url_errors else ["unknown-model"])),
        openapi_extra=bodies.documented_body(compat.TimeseriesRequest),
    )
    async def timeseries_forecast(
        request: Request,
        url_model: TimeseriesModel,
        jobs: Jobs,
        owner: LegacyCaller,
        response: Response,
    ) -> compat.TimeseriesResponse:
        """The evaluation client's call: the median forecast of `recent_data`."""
        body = await bodies.model_body(request, jobs.settings, compat.TimeseriesRequest)
        if url_model is not None:
            spec = url_model
        elif body.model is not None:
            spec = jobs.fleet.model(body.model)
        else:
            raise Problem(422, "validation-error", "model: required on this route", field="model")
        permit_model(request, spec.id)
        window = body.recent_data[-body.context_period_size :] if body.context_period_size else body.recent_data
        if all(x is None or math.isnan(x) for x in window):  # a valid body whose window holds nothing to forecast
            raise Problem(
                422, "validation-error",
                f"recent_data: its last {len(window)} values (context_period_size) hold no observed value",
                field="recent_data",
            )  # fmt: skip
        record = await _run(jobs, compat.timeseries_request(spec, body), owner, response)
        return compat.timeseries_response(record, body)

    return router


async def _run(jobs: JobService, request: ForecastRequest, owner: str, response: Response):
    """A compat call through the queue: the sync lane where the model has one, waiting up to COMPAT_TIMEOUT_S.
    503 `no-worker` at once when no worker serves the model: the old server failed at once too (no
    container), and a client that retries a timeout would otherwise wait its full timeout each time."""
    spec = jobs.fleet.model(request.model)
    lane = Lane.SYNC if jobs.settings.sync_eligible(spec) else Lane.ASYNC
    record = await jobs.run(request, lane, owner, jobs.settings.compat_timeout_s)
    # Headers, so that the old bodies stay exactly as they were: the job, and what weights answered.
    response.headers["X-Job-Id"] = record.id
    if record.status is not JobStatus.SUCCEEDED:
        raise Problem(
            504,
            "forecast-timeout",
            f"no forecast within {jobs.settings.compat_timeout_s:g}s; the job continues: GET /v1/forecasts/{record.id}",
            job_id=record.id,
            headers={"X-Job-Id": record.id},
        )
    if record.weights:
        response.headers["X-Chronos-Weights"] = record.weights
    return record


default = build("", _default_model, _no_model)
per_model = build("/models/{slug}", _path_model, _path_model)
