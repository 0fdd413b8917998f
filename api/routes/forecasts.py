"""Native forecast jobs: submit, poll or long-wait, cancel, and the synchronous predict."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from shared.jobs import JobRecord, JobStatus, Lane
from shared.schemas import ForecastRequest, JobView
from shared.settings import Settings

from api import bodies, render
from api.auth import Caller
from api.deps import service, settings
from api.problems import BODY_ERRORS, COLUMNAR_ERRORS, documented
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
    'event: status\ndata: {"id": "3f2a…", "kind": "backtest", "status": "running", '
    '"progress": {"done": 64, "total": 250}, …}\n\n'
    'event: done\ndata: {"id": "3f2a…", "kind": "backtest", "status": "succeeded", "backtest": {…}, …}\n\n'
)


def _location(response: Response, job_id: str) -> None:
    response.headers["Location"] = f"/v1/forecasts/{job_id}"


# Answers with more series than this are streamed, rendered piece by piece off the event loop.
STREAM_FROM = 2_000


async def answer(jobs: JobService, record: JobRecord, request: Request, response: Response) -> Response:
    """The job as JSON, results included once it succeeded; the results alone as an Arrow stream or
    Parquet file when `Accept` asks for one. Rendered from the stored arrays (api/render.py)."""
    outputs = items = None
    if record.status is JobStatus.SUCCEEDED and record.predictions is None:
        outputs, items = await jobs.results(record)
        media = render.wanted(request.headers.get("accept"))
        if media and record.kind.value == "forecast":
            body = render.columnar(record, outputs, items, media)
            return Response(
                body, status_code=response.status_code or 200, headers=dict(response.headers), media_type=media
            )
    if outputs is not None and len(outputs) > STREAM_FROM and record.kind.value == "forecast":
        return StreamingResponse(
            render.job_json_chunks(record, outputs, items),
            status_code=response.status_code or 200,
            headers=dict(response.headers),
            media_type="application/json",
        )
    body = render.job_json(record, outputs, items)
    return Response(body, status_code=response.status_code or 200, headers=dict(response.headers),
                    media_type="application/json")  # fmt: skip


async def workers_online(response: Response, jobs: JobService, model: str) -> None:
    """`X-Workers-Online: N` on an accepted async job: 0 says it waits until a worker of its model starts."""
    response.headers["X-Workers-Online"] = str(await jobs.workers_online(model))


SUBMIT_ERRORS = (*BODY_ERRORS, *COLUMNAR_ERRORS, "unauthorized", "unknown-model", "limit-exceeded", "not-sample-based",
                 "unsupported-input", "broker-unavailable", "redis-unavailable", "rate-limited",
                 "too-many-in-flight", "queue-full", "idempotency-key-reused", "callback-not-allowed")  # fmt: skip


@router.post(
    "/forecasts",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses=documented(*SUBMIT_ERRORS),
    openapi_extra=bodies.documented_body(ForecastRequest, columnar=True),
)
async def submit_forecast(
    request: Request, response: Response, jobs: Service, owner: Caller, idempotency_key: IdempotencyKey = None
) -> Response:
    """Queue a forecast job on its model's queue; poll or long-wait on the returned id.

    The body is JSON, or an Arrow IPC stream / Parquet file in long format with the parameters in
    the query string. With an `Idempotency-Key`, sending the same request again returns the same
    job (`Idempotent-Replayed: true`) instead of queueing another. `X-Workers-Online` counts the
    model's live workers: with 0 the job is queued until one starts.
    """
    await jobs.admit(owner)  # the key is checked and its rate taken before any of the body is read
    job = await bodies.forecast(request, jobs.settings)
    record, replayed = await jobs.submit(job, Lane.ASYNC, owner, idempotency_key, admitted=True)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    _location(response, record.id)
    response.status_code = status.HTTP_202_ACCEPTED
    await workers_online(response, jobs, record.model)
    return await answer(jobs, record, request, response)


@router.get(
    "/forecasts/{job_id}",
    response_model=JobView,
    responses=documented("unauthorized", "unknown-job", "redis-unavailable"),
)
async def get_forecast(
    job_id: str,
    request: Request,
    response: Response,
    jobs: Service,
    config: Config,
    owner: Caller,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for a terminal state (capped).")] = 0,
) -> Response:
    """A job's status; with `wait`, answer as soon as it finishes (or when the wait runs out).
    `Accept: application/vnd.apache.arrow.stream` (or `application/vnd.apache.parquet`) returns
    a succeeded forecast's results as a long-format table instead."""
    wait = min(wait, config.wait_max_s)
    record = await (jobs.wait(job_id, wait, owner) if wait > 0 else jobs.require(job_id, owner))
    return await answer(jobs, record, request, response)


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
            if record.terminal:
                outputs, items = (await jobs.results(record)) if record.status is JobStatus.SUCCEEDED else (None, None)
                yield f"event: done\ndata: {render.job_json(record, outputs, items).decode()}\n\n"
            else:
                view = JobView.of(record)
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
    openapi_extra=bodies.documented_body(ForecastRequest, columnar=True),
)
async def predict(
    request: Request,
    response: Response,
    jobs: Service,
    config: Config,
    owner: Caller,
    timeout: Annotated[float | None, Query(gt=0, description="Seconds to wait (capped).")] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Forecast in one round trip on a sync-eligible model, through its priority lane.

    On timeout the answer is 202 with the job's id and a Location to poll: the job keeps running.
    """
    wait = min(timeout or config.sync_timeout_default_s, config.sync_timeout_max_s)
    await jobs.admit(owner)  # before any of the body is read
    job = await bodies.forecast(request, config)
    record = await jobs.run(job, Lane.SYNC, owner, wait, idempotency_key, with_results=False, admitted=True)
    if record.status is not JobStatus.SUCCEEDED:
        response.status_code = status.HTTP_202_ACCEPTED
        _location(response, record.id)
    return await answer(jobs, record, request, response)
