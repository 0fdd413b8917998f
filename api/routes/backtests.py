"""Backtests: a rolling-origin evaluation of one series as one job (workers/backtest.py scores it).

The job is read, long-waited and cancelled like any other (`/v1/backtests/{id}` and
`/v1/forecasts/{id}` answer the same); its record carries `progress` while it runs and
`backtest` (per-origin forecasts and scores) once it succeeded.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from shared.schemas import BacktestRequest, JobView

from api import bodies
from api.answers import accepted, add_job_routes, answer
from api.auth import Caller, permit_model
from api.deps import IdempotencyKey, Jobs
from api.problems import SUBMIT_ERRORS, documented

router = APIRouter(prefix="/v1", tags=["backtests"])


@router.post(
    "/backtests",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses=documented(*SUBMIT_ERRORS),
    openapi_extra=bodies.documented_body(BacktestRequest, columnar=True),
)
async def submit_backtest(
    request: Request,
    response: Response,
    jobs: Jobs,
    owner: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Queue a backtest: a forecast from every origin `first, first+step, … last` of the series, each
    from the `context_length` points before it, scored against the series' own later values (MASE,
    weighted quantile loss, interval coverage). All origins run as one job in model-sized batches.
    The series may also come as an Arrow stream or Parquet file (one series, long format), with
    `model`, `first`, `last`, `step`, `context_length` and the parameters in the query string.
    `X-Workers-Online` counts the model's live workers: with 0 the job is queued until one starts."""
    await jobs.admission.admit(owner)  # the key is checked and its rate taken before any of the body is read
    kind = bodies.media_type(request)
    if kind in bodies.COLUMNAR:
        permit_model(request, request.query_params.get("model", ""))  # in the query: before the body is read
        raw = await bodies.read(request, jobs.settings.max_columnar_body_bytes, jobs.settings.body_timeout_s)
        body = bodies.backtest_columnar(raw, kind, dict(request.query_params), jobs.settings)
    else:
        body = await bodies.model_body(request, jobs.settings, BacktestRequest)
        permit_model(request, body.model)
    record, replayed = await jobs.submit_backtest(body, owner, idempotency_key, admitted=True)
    await accepted(response, jobs.fleet, record, replayed)
    return await answer(jobs, record, request, response)


add_job_routes(router, "backtests", "backtest")
