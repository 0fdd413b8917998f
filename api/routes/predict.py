"""The serving design's names for the synchronous predict: `POST /predict` (one series, as `input`)
and `POST /predict/batch` (many, as `requests`). Both are `/v1/predict` under another body shape:
the same lane, limits, answers and errors (`answers.predict`)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from shared.schemas import BatchPredictRequest, JobView, PredictRequest

from api import answers, bodies, deps
from api.hot import hot
from api.problems import SUBMIT_ERRORS, documented

router = APIRouter(tags=["forecasts"])


def _add(path: str, shape: bodies.Shape, documented_body: type[BaseModel], summary: str, description: str) -> None:
    @hot
    async def endpoint(request: Request, response: Response) -> Response:
        return await answers.predict(request, response, shape)

    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        response_model=JobView,
        responses={
            202: {"model": JobView, "description": "Timed out; the job continues, poll its id."},
            **documented(*SUBMIT_ERRORS, "not-sync-eligible", "job-cancelled", "forecast-failed", "no-worker"),
        },
        openapi_extra=(
            bodies.documented_body(documented_body, columnar=True) | deps.read_by_hand("timeout", "Idempotency-Key")
        ),
        summary=summary,
        description=description,
        operation_id=path.strip("/").replace("/", "_"),
    )


_add(
    "/predict", bodies.ONE, PredictRequest, "Predict one series (the design's name for /v1/predict)",
    "`/v1/predict` for one series, sent as `input` (or as `inputs` holding one series): the answer is the job "
    "with one prediction. An Arrow or Parquet body holds one series.",
)  # fmt: skip
_add(
    "/predict/batch", bodies.BATCH, BatchPredictRequest, "Predict many series (the design's name for /v1/predict)",
    "`/v1/predict` with the series as `requests` (or `inputs`): one prediction per series, in order.",
)  # fmt: skip
