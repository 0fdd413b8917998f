"""Anomaly detection: each series' points scored against the model's forecast interval for them
(workers/anomaly.py), one job per request.

The job is read, long-waited, followed and cancelled like any other (`/v1/anomalies/{id}`); its
record carries `progress` (forecasts done) while it runs and `anomalies` once it succeeded.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from shared.schemas import AnomalyParameters, AnomalyRequest, JobView

from api import bodies
from api.answers import accepted, add_job_routes, answer
from api.auth import Caller
from api.deps import IdempotencyKey, Jobs, Models
from api.problems import SUBMIT_ERRORS, documented

router = APIRouter(prefix="/v1", tags=["anomalies"])


@router.post(
    "/anomalies",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses=documented(*SUBMIT_ERRORS),
    openapi_extra=bodies.documented_body(AnomalyRequest, columnar=True),
)
async def submit_anomalies(
    request: Request,
    response: Response,
    jobs: Jobs,
    models: Models,
    owner: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Queue an anomaly job: every point of each series from `score_from` on is forecast from the
    (up to `context_length`) points before it, one step ahead (or `horizon` steps, from origins
    `horizon` apart), and flagged when it falls outside the central interval of width `level`.
    All the forecasts run as one job in model-sized batches. Scoring only the last N points of a
    series (online use) is `score_from = len - N`. The series may also come as an Arrow stream or
    Parquet file in long format, with `model` and the parameters in the query string.
    `X-Workers-Online` counts the model's live workers: with 0 the job is queued until one starts."""
    await jobs.admission.admit(owner)  # the key is checked and its rate taken before any of the body is read
    job = await bodies.forecast(request, jobs.settings, schema=AnomalyParameters)
    record, replayed = await jobs.submit_anomalies(job, owner, idempotency_key, admitted=True)
    await accepted(response, models, record, replayed)
    return await answer(jobs, record, request, response)


add_job_routes(router, "anomalies", "anomaly job")
