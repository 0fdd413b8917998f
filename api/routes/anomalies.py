"""Anomaly detection: each series' points scored against the model's forecast interval for them
(workers/anomaly.py), one job per request.

The job is read, long-waited, followed and cancelled like any other (`/v1/anomalies/{id}`); its
record carries `progress` (forecasts done) while it runs and `anomalies` once it succeeded.
"""

from __future__ import annotations

from fastapi import APIRouter

from shared.schemas import AnomalyParameters, AnomalyRequest

from api.answers import add_job_routes, add_series_job_route
from api.service import JobService

router = APIRouter(prefix="/v1", tags=["anomalies"])

add_series_job_route(
    router,
    "anomalies",
    AnomalyRequest,
    AnomalyParameters,
    JobService.submit_anomalies,
    """Queue an anomaly job: every point of each series from `score_from` on is forecast from the
    (up to `context_length`) points before it, one step ahead (or `horizon` steps, from origins
    `horizon` apart), and flagged when it falls outside the central interval of width `level`.
    All the forecasts run as one job in model-sized batches. Scoring only the last N points of a
    series (online use) is `score_from = len - N`. The series may also come as an Arrow stream or
    Parquet file in long format, with `model` and the parameters in the query string.
    `X-Workers-Online` counts the model's live workers: with 0 the job is queued until one starts.""",
)
add_job_routes(router, "anomalies", "anomaly job")
