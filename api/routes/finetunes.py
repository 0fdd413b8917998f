"""Fine-tuning as a job: `Chronos2Pipeline.fit` on the caller's series, on a training worker of the
base model (workers/training.py); the result is a model only the caller can use.

The job is read, long-waited, followed and cancelled like any other (`/v1/finetunes/{id}`): its
`progress` counts steps, its `finetune` record holds the loss per step and, once it succeeded, the
validation scores; `finetuned_model` names the new model.
"""

from __future__ import annotations

from fastapi import APIRouter

from shared.schemas import FinetuneParameters, FinetuneRequest

from api.answers import add_job_routes, add_series_job_route
from api.service import JobService

router = APIRouter(prefix="/v1", tags=["fine-tuning"])

add_series_job_route(
    router,
    "finetunes",
    FinetuneRequest,
    FinetuneParameters,
    JobService.submit_finetune,
    """Queue a fine-tuning job of a base model (amazon/chronos-2) on these series: `num_steps` steps
    of LoRA (default) or full fine-tuning, on a training worker of the model, never in the way of
    its inference workers. With `validation` (default), the last `prediction_length` points of each
    series are held out and both models are scored on them. Once it succeeded, `finetuned_model`
    names the new model: forecasts, backtests and anomaly jobs take it as `model`, for this key
    only. The series may also come as an Arrow stream or Parquet file in long format, with `model`
    and the parameters in the query string. `X-Workers-Online` counts the model's inference workers.""",
)
add_job_routes(router, "finetunes", "fine-tuning job")
