"""Native forecast jobs: submit, poll or long-wait, cancel, and the synchronous predict."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response, status
from fastapi.responses import StreamingResponse

from shared.jobs import JobStatus, Lane
from shared.schemas import ForecastRequest, JobView
from shared.settings import Settings

from api.auth import Caller
from api.deps import service, settings
from api.problems import BODY_ERRORS, documented
from api.service import JobService

router = APIRouter(prefix="/v1", tags=["forecasts"])

Service = Annotated[JobService, Depends(service)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Any unique string: a retried request with the same key and body returns the same job.",
    ),
]
Config = Annotated[Settings, Depends(settings)]


STREAM_EXAMPLE = (
    'event: status\ndata: {"id": "3f2a…", "kind": "backtest", "status": "running", "progress": {"done": 64, "total": 250}, …}\n\n'
    'event: done\ndata: {"id": "3f2a…", "kind": "backtest", "status": "succeeded", "backtest": {…}, …}\n\n'
)


def _location(response: Response, job_id: str) -> None:
    response.headers["Location"] = f"/v1/forecasts/{job_id}"


async def workers_online(response: Response, jobs: JobService, model: str) -> None:
    """`X-Workers-Online: N` on an accepted async job: 0 says it waits until a worker of its model starts."""
    response.headers["X-Workers-Online"] = str(await jobs.workers_online(model))


SUBMIT_ERRORS = (*BODY_ERRORS, "unauthorized", "unknown-model", "limit-exceeded", "not-sample-based",
                 "unsupported-input", "broker-unavailable", "redis-unavailable", "rate-limited",
                 "too-many-in-flight", "queue-full", "idempotency-key-reused", "callback-not-allowed")  # fmt: skip


@router.post(
    "/forecasts", status_code=status.HTTP_202_ACCEPTED, response_model=JobView, responses=documented(*SUBMIT_ERRORS)
)
async def submit_forecast(
    body: ForecastRequest, response: Response, jobs: Service, owner: Caller, idempotency_key: IdempotencyKey = None
) -> JobView:
    """Queue a forecast job on its model's queue; poll or long-wait on the returned id.

    With an `Idempotency-Key`, sending the same request again returns the same job
    (`Idempotent-Replayed: true`) instead of queueing another. `X-Workers-Online` counts the
    model's live workers: with 0 the job is queued until one starts.
    """
    record, replayed = await jobs.submit(body, Lane.ASYNC, owner, idempotency_key)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    _location(response, record.id)
    await workers_online(response, jobs, record.model)
    return JobView.of(record)


@router.get(
    "/forecasts/{job_id}",
    response_model=JobView,
    responses=documented("unauthorized", "unknown-job", "redis-unavailable"),
)
async def get_forecast(
    job_id: str,
    jobs: Service,
    config: Config,
    owner: Caller,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for a terminal state (capped).")] = 0,
) -> JobView:
    """A job's status; with `wait`, answer as soon as it finishes (or when the wait runs out)."""
    wait = min(wait, config.wait_max_s)
    record = await (jobs.wait(job_id, wait, owner) if wait > 0 else jobs.require(job_id, owner))
    return JobView.of(record)


@router.get(
    "/forecasts/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"example": STREAM_EXAMPLE}}, "description": "Server-Sent Events."},
        **documented("unauthorized", "unknown-job", "redis-unavailable"),
    },
)
async def job_events(job_id: str, jobs: Service, owner: Caller) -> StreamingResponse:
    """A Server-Sent Events stream of the job's changes: `event: status` with the job (without its
    results) whenever its status or progress changes, then `event: done` with the whole job, and the
    stream ends. A comment line every 15 s keeps idle connections open."""
    await jobs.require(job_id, owner)  # an unknown job is a plain 404, not an empty stream

    async def stream():
        async for record in jobs.changes(job_id, owner):
            if record is None:
                yield ": keep-alive\n\n"
                continue
            view = JobView.of(record)
            if record.terminal:
                yield f"event: done\ndata: {view.model_dump_json()}\n\n"
            else:
                yield f"event: status\ndata: {view.model_dump_json(exclude={'predictions', 'backtest'})}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


@router.delete(
    "/forecasts/{job_id}",
    response_model=JobView,
    responses={
        202: {"model": JobView, "description": "Running: it stops at its next batch."},
        **documented("unauthorized", "unknown-job", "job-finished", "redis-unavailable"),
    },
)
async def cancel_forecast(job_id: str, response: Response, jobs: Service, owner: Caller) -> JobView:
    """Cancel a job: a queued one never runs (200); a running one stops at its next batch (202)."""
    record, stopped = await jobs.cancel(job_id, owner)
    if not stopped:
        response.status_code = status.HTTP_202_ACCEPTED
    return JobView.of(record)


@router.post(
    "/predict",
    response_model=JobView,
    responses={
        202: {"model": JobView, "description": "Timed out; the job continues, poll its id."},
        **documented(*SUBMIT_ERRORS, "not-sync-eligible", "job-cancelled", "forecast-failed", "no-worker"),
    },
)
async def predict(
    body: ForecastRequest,
    response: Response,
    jobs: Service,
    config: Config,
    owner: Caller,
    timeout: Annotated[float | None, Query(gt=0, description="Seconds to wait (capped).")] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobView:
    """Forecast in one round trip on a sync-eligible model, through its priority lane.

    On timeout the answer is 202 with the job's id and a Location to poll: the job keeps running.
    """
    wait = min(timeout or config.sync_timeout_default_s, config.sync_timeout_max_s)
    record = await jobs.run(body, Lane.SYNC, owner, wait, idempotency_key)
    if record.status is JobStatus.SUCCEEDED:
        return JobView.of(record)
    response.status_code = status.HTTP_202_ACCEPTED
    _location(response, record.id)
    return JobView.of(record)
