"""Fine-tuning as a job: `Chronos2Pipeline.fit` on the caller's series, on a training worker of the
base model (workers/training.py); the result is a model only the caller can use.

The job is read, long-waited, followed and cancelled like any other (`/v1/finetunes/{id}`): its
`progress` counts steps, its `finetune` record holds the loss per step and, once it succeeded, the
validation scores; `finetuned_model` names the new model.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from shared.schemas import FinetuneParameters, FinetuneRequest, JobView

from api import bodies
from api.answers import accepted, add_job_routes, answer
from api.auth import Caller
from api.deps import IdempotencyKey, Jobs, Models
from api.problems import SUBMIT_ERRORS, documented

router = APIRouter(prefix="/v1", tags=["fine-tuning"])


@router.post(
    "/finetunes",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses=documented(*SUBMIT_ERRORS),
    openapi_extra=bodies.documented_body(FinetuneRequest, columnar=True),
)
async def submit_finetune(
    request: Request,
    response: Response,
    jobs: Jobs,
    models: Models,
    owner: Caller,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Queue a fine-tuning job of a base model (amazon/chronos-2) on these series: `num_steps` steps
    of LoRA (default) or full fine-tuning, on a training worker of the model, never in the way of
    its inference workers. With `validation` (default), the last `prediction_length` points of each
    series are held out and both models are scored on them. Once it succeeded, `finetuned_model`
    names the new model: forecasts, backtests and anomaly jobs take it as `model`, for this key
    only. The series may also come as an Arrow stream or Parquet file in long format, with `model`
    and the parameters in the query string. `X-Workers-Online` counts the model's inference workers."""
    await jobs.admission.admit(owner)  # the key is checked and its rate taken before any of the body is read
    job = await bodies.forecast(request, jobs.settings, schema=FinetuneParameters)
    record, replayed = await jobs.submit_finetune(job, owner, idempotency_key, admitted=True)
    await accepted(response, models, record, replayed)
    return await answer(jobs, record, request, response)


add_job_routes(router, "finetunes", "fine-tuning job")
