"""The contract of the per-model Chronos server this product replaces (docs/api.md, compat routes), as translations.

Each compat request becomes a native `ForecastRequest` and runs through the same queue and
worker as `/v1/forecasts`; each answer is built from the finished job. Request models ignore
unknown fields, as the old server's did, so an existing client keeps working unchanged.

A T5 call is given a seed derived from its own input and sampling options: the old contract has
no seed, and without one a client's retry would be a different request, run again instead of
joining the job already computing it (single-flight, api/service.py). So the same call gives the same forecast.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared import catalog, families
from shared.schemas import ForecastParameters, ForecastRequest, ModelView, SeriesInput, finite_with_an_observation
from shared.store import JobRecord

API_VERSION = "1.0.0"
# The old server's quantile keys: "10" ... "90" for the levels 0.1 ... 0.9.
DECILES = [round(0.1 * i, 1) for i in range(1, 10)]

ModelStatus = Literal["uninitialized", "initializing", "ready", "error"]

# The legacy routes, un-prefixed or under /models/{slug}: their errors also carry an `error` member.
_LEGACY_PATH = re.compile(r"(/models/[^/]+)?(/health|/v1/timeseries/forecast|/forecast/v1/chronos/[^/]+)")


def legacy_path(path: str) -> bool:
    return _LEGACY_PATH.fullmatch(path) is not None


class HealthResponse(BaseModel):
    status: Literal["healthy"] = "healthy"
    timestamp: str = Field(description="When this answer was made (ISO 8601, UTC), as the old server sent it.")
    api_version: str = Field(description="The old server's API version.")
    models: dict[str, ModelStatus] = Field(description="The model this URL serves, and its status.")
    model: str = Field(description="The model this URL serves.")
    model_status: ModelStatus


class InitializationRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={"examples": [{"model_variant": "amazon/chronos-t5-tiny", "device": "cpu"}]},
    )

    model_variant: str | None = Field(
        None, description="Must name the model this URL serves, if given (workers load their model at start)."
    )
    device: str | None = Field(None, description="Accepted and ignored: the device is the worker's.")


class ModelInfo(BaseModel):
    model_variant: str
    device: str
    status: ModelStatus


class InitializationResponse(BaseModel):
    message: str
    model_status: ModelStatus
    model_info: ModelInfo


class StatusResponse(BaseModel):
    model_status: ModelStatus
    details: str | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={
            "examples": [{"context": [1.0, 2.0, 3.0, 4.0, 5.0], "prediction_length": 3, "num_samples": 20}]
        },
    )

    context: list[float | None] = Field(min_length=1, description="History, oldest first.")
    _observed = field_validator("context")(lambda values: finite_with_an_observation(values))
    prediction_length: int = Field(gt=0)
    num_samples: int = Field(20, gt=0, description="T5 sample paths; Bolt outputs quantiles and ignores it.")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(50, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


class InferenceMetadata(BaseModel):
    context_length: int
    prediction_length: int
    num_samples: int = Field(description="Sample paths drawn (0 for Bolt, whose quantiles come from the model).")
    model_variant: str
    inference_time_seconds: float


class Prediction(BaseModel):
    median: list[float]
    mean: list[float]
    quantiles: dict[str, list[float]] = Field(description='Keys "10" ... "90": the 0.1 ... 0.9 quantiles.')
    samples: list[list[float]] = Field(description="num_samples paths of T5 models; empty for Bolt.")
    metadata: InferenceMetadata


class ExecutionMetadata(BaseModel):
    total_time_seconds: float
    model_version: str
    api_version: str


class InferenceResponse(BaseModel):
    prediction: Prediction
    execution_metadata: ExecutionMetadata


class TimeseriesRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "SPY",
                    "model": "amazon/chronos-t5-tiny",
                    "context_period_size": 5,
                    "forecast_period_size": 2,
                    "recent_data": [101.2, 101.9, 102.4, 101.7, 102.8],
                    "as_of_date": "2025-01-31",
                }
            ]
        },
    )

    name: str = Field(max_length=256)
    model: str | None = Field(None, description="Catalog id or slug; under /models/{slug} the URL's model is used.")
    context_period_size: int | None = Field(None, gt=0, description="Use at most this many of the latest points.")
    forecast_period_size: int = Field(gt=0)
    recent_data: list[float | None] = Field(min_length=1)
    _observed = field_validator("recent_data")(lambda values: finite_with_an_observation(values))
    as_of_date: str | None = None


class TimeseriesResponse(BaseModel):
    name: str
    forecast: list[float] = Field(description="The median forecast.")
    message: str = "Success"


def inference_request(spec: catalog.ModelSpec, body: InferenceRequest) -> ForecastRequest:
    sampled = families.of(spec).sample_based
    sampling = {"num_samples": body.num_samples, "temperature": body.temperature, "top_k": body.top_k,
                "top_p": body.top_p}  # fmt: skip
    params = ForecastParameters(
        prediction_length=body.prediction_length,
        quantile_levels=DECILES,
        **({**sampling, "return_samples": True, "seed": _seed(body.context, sampling)} if sampled else {}),
    )
    return ForecastRequest(model=spec.id, inputs=[SeriesInput(target=body.context)], parameters=params)


def _forecast(record: JobRecord) -> dict:
    """The forecast of a compat job's one series (the record comes with its predictions)."""
    if record.predictions is None or len(record.predictions) != 1:
        raise RuntimeError(f"job {record.id}: expected the predictions of one series")
    return record.predictions[0]


def inference_response(record: JobRecord, body: InferenceRequest) -> InferenceResponse:
    forecast = _forecast(record)
    timings = record.timings()
    return InferenceResponse(
        prediction=Prediction(
            median=forecast["0.5"],
            mean=forecast["mean"],
            quantiles={str(round(q * 100)): forecast[str(q)] for q in DECILES},
            samples=forecast.get("samples", []),
            metadata=InferenceMetadata(
                context_length=len(body.context),
                prediction_length=body.prediction_length,
                num_samples=len(forecast.get("samples", [])),
                model_variant=record.model,
                inference_time_seconds=round(record.inference_s or 0.0, 3),
            ),
        ),
        execution_metadata=ExecutionMetadata(
            total_time_seconds=round(timings["total_s"] or 0.0, 3), model_version=record.model, api_version=API_VERSION
        ),
    )


def timeseries_request(spec: catalog.ModelSpec, body: TimeseriesRequest) -> ForecastRequest:
    data = body.recent_data[-body.context_period_size :] if body.context_period_size else body.recent_data
    sampled = families.of(spec).sample_based
    seed = {"seed": _seed(data, {"prediction_length": body.forecast_period_size})} if sampled else {}
    return ForecastRequest(
        model=spec.id,
        inputs=[SeriesInput(target=data, item_id=body.name)],
        parameters=ForecastParameters(prediction_length=body.forecast_period_size, quantile_levels=[0.5], **seed),
    )


def _seed(context: list[float | None], options: dict) -> int:
    """A T5 call's sampling seed: a function of what it asks, so that a retry is the same request."""
    canonical = json.dumps([context, options], sort_keys=True, separators=(",", ":"))
    return int(hashlib.sha256(canonical.encode()).hexdigest()[:15], 16)


def timeseries_response(record: JobRecord, body: TimeseriesRequest) -> TimeseriesResponse:
    forecast = _forecast(record)
    return TimeseriesResponse(name=body.name, forecast=forecast["0.5"])


def status(view: ModelView) -> StatusResponse:
    """The old server's model status, from the live state of the model's workers."""
    if view.workers_online == 0:
        return StatusResponse(
            model_status="uninitialized",
            details=f"Model: {view.id}. No worker online; {view.queue_depth + view.sync_queue_depth} job(s) queued",
        )
    weights = f", {view.weights} weights" if view.weights else ""
    return StatusResponse(model_status="ready", details=f"Model: {view.id} ({view.workers_online} worker(s){weights})")


def health(view: ModelView) -> HealthResponse:
    """The old server's /health fields, and which model this URL serves."""
    model_status = status(view).model_status
    return HealthResponse(
        timestamp=datetime.fromtimestamp(time.time(), UTC).isoformat(),
        api_version=API_VERSION,
        models={view.id: model_status},
        model=view.id,
        model_status=model_status,
    )


def model_info(view: ModelView) -> ModelInfo:
    return ModelInfo(
        model_variant=view.id, device=view.workers[0].device if view.workers else "unknown", status="ready"
    )
