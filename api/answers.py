"""How a job is answered, for forecasts and backtests alike: the job as JSON (streamed when large),
its results as a table, the headers of an accepted job, the handlers of `/{jobs}/{job_id}`
(read, long-wait, follow as Server-Sent Events, cancel) that both route modules register, and the
synchronous predict that `/v1/predict` and the design's `/predict` routes share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from shared.schemas import JobView
from shared.store import JobKind, JobRecord, JobStatus, Lane

from api import bodies, deps, ensembles, render
from api.auth import Caller, is_admin, owner_of
from api.deps import IdempotencyKey, Jobs
from api.fleet import Fleet
from api.hot import hot
from api.problems import SUBMIT_ERRORS, Problem, documented
from api.service import JobService, unless_succeeded

# Answers with more series than this are streamed, rendered piece by piece off the event loop.
STREAM_FROM = 2_000

STREAM_EXAMPLE = (
    'event: status\ndata: {"id": "3f2a…", "kind": "backtest", "status": "running", '
    '"progress": {"done": 64, "total": 250}, …}\n\n'
    'event: done\ndata: {"id": "3f2a…", "kind": "backtest", "status": "succeeded", "backtest": {…}, …}\n\n'
)


def preferred_wait(prefer: str | None, most: float) -> float:
    """The seconds a `Prefer: wait=N` header asks for (RFC 7240 section 4.3), capped at `most`; 0
    without one. Other preferences are ignored, as the RFC asks."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return max(0.0, min(float(value.strip().strip('"')), most))
            except ValueError:
                return 0.0
    return 0.0


def location(response: Response, record: JobRecord) -> None:
    response.headers["Location"] = f"/v1/{record.kind.collection}/{record.id}"


def served_by(response: Response, record: JobRecord) -> None:
    """`Served-By`: the model that runs the job, which a fallback or an A/B split may have changed."""
    response.headers["Served-By"] = record.model


async def accepted(response: Response, fleet: Fleet, record: JobRecord, replayed: bool) -> None:
    """202 with the job's Location; `Idempotent-Replayed` for an earlier job; `X-Workers-Online: N`
    (0 says the job waits until a worker of its model starts)."""
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    location(response, record)
    served_by(response, record)
    response.status_code = status.HTTP_202_ACCEPTED
    response.headers["X-Workers-Online"] = str(await fleet.workers_online(record.model))


async def answer(jobs: JobService, record: JobRecord, request: Request, response: Response) -> Response:
    """The job as JSON, results included once it succeeded; the results alone as an Arrow stream or
    Parquet file when `Accept` asks for one. Rendered from the stored arrays (api/render.py)."""
    request.state.job_id, request.state.model = record.id, record.model  # for the audit log
    outputs = items = None
    code, headers = response.status_code or 200, dict(response.headers)
    if record.status is JobStatus.SUCCEEDED and record.predictions is None:
        outputs, items = await jobs.results(record)
        media = render.wanted(request.headers.get("accept"))
        if media and record.kind is not JobKind.BACKTEST:
            return Response(render.columnar(record, outputs, items, media), code, headers, media_type=media)
    if outputs is not None and len(outputs) > STREAM_FROM and record.kind is JobKind.FORECAST:
        chunks = render.job_json_chunks(record, outputs, items)
        return StreamingResponse(chunks, code, headers, media_type="application/json")
    return Response(render.job_json(record, outputs, items), code, headers, media_type="application/json")


@hot
async def get_job(job_id: str, request: Request, response: Response) -> Response:
    """A job's status; with `wait`, answer as soon as it finishes (or when the wait runs out).
    `Accept: application/vnd.apache.arrow.stream` (or `application/vnd.apache.parquet`) returns
    a succeeded forecast's results as a long-format table instead."""
    jobs, owner = deps.jobs_of(request), owner_of(request)  # a hot route (api/deps.py)
    wait = min(deps.read(request, "wait"), jobs.settings.wait_max_s)
    try:
        record = await (jobs.wait(job_id, wait, owner) if wait > 0 else jobs.require(job_id, owner, with_results=True))
    except Problem as problem:
        if problem.code != "unknown-job" or not is_admin(request):
            raise
        # An admin key reading another owner's job: its metadata and owner, never its series or results.
        record = await jobs.inspect(job_id)
        request.state.job_id, request.state.model = record.id, record.model
        return Response(render.job_metadata(record), media_type="application/json")
    return await answer(jobs, record, request, response)


async def job_events(job_id: str, jobs: Jobs, owner: Caller) -> StreamingResponse:
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
                view = JobView.of(record).model_dump_json(exclude={"anomalies", "predictions", "backtest"})
                yield f"event: status\ndata: {view}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


async def cancel_job(job_id: str, request: Request, response: Response, jobs: Jobs, owner: Caller) -> JobView:
    """Cancel a job: a queued one never runs (200); a running one stops at its next batch (202).
    An `admin` key may cancel any owner's job."""
    request.state.job_id = job_id
    record, stopped = await jobs.cancel(job_id, owner, any_owner=is_admin(request))
    if not stopped:
        response.status_code = status.HTTP_202_ACCEPTED
    return JobView.of(record)


async def predict(request: Request, response: Response, shape: bodies.Shape = bodies.NATIVE) -> Response:
    """The synchronous predict of `/v1/predict` and of the design's `/predict` and `/predict/batch`,
    which differ only in the `shape` of their JSON bodies: submit on the model's priority lane and
    wait up to `timeout` (capped); 202 with the job's Location when the wait runs out. A hot route:
    it reads its dependencies itself (api/deps.py)."""
    jobs, owner = deps.jobs_of(request), owner_of(request)
    timeout, idempotency_key = deps.read(request, "timeout"), deps.read(request, "Idempotency-Key")
    config = jobs.settings
    wait = min(timeout or config.sync_timeout_default_s, config.sync_timeout_max_s)
    await jobs.admission.admit(owner)  # before any of the body is read
    job = await bodies.forecast(request, config, shape)
    ensemble = jobs.router.ensemble(job.model)
    if ensemble is not None:  # a virtual model: a job per member, combined (api/ensembles.py)
        record = await ensembles.predict(jobs, ensemble, job, owner, wait)
        unless_succeeded(record)
    else:
        record = await jobs.run(job, Lane.SYNC, owner, wait, idempotency_key, with_results=False, admitted=True)
    served_by(response, record)
    if record.status is not JobStatus.SUCCEEDED:
        response.status_code = status.HTTP_202_ACCEPTED
        location(response, record)
    return await answer(jobs, record, request, response)


def add_series_job_route(
    router: APIRouter,
    collection: str,
    body: type[BaseModel],
    parameters: type[BaseModel],
    submit_job: Callable[..., Awaitable[tuple[JobRecord, bool]]],
    description: str,
) -> None:
    """`POST /{collection}`: a job whose body is series and `parameters` (as a forecast's, by the
    `parameters` model: an anomaly job, a fine-tuning job), submitted by the `JobService` method
    `submit_job`. The key is checked and its rate token taken before any of the body is read."""

    async def submit(
        request: Request,
        response: Response,
        jobs: Jobs,
        owner: Caller,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        await jobs.admission.admit(owner)
        job = await bodies.forecast(request, jobs.settings, schema=parameters)
        record, replayed = await submit_job(jobs, job, owner, idempotency_key, admitted=True)
        await accepted(response, jobs.fleet, record, replayed)
        return await answer(jobs, record, request, response)

    router.add_api_route(
        f"/{collection}",
        submit,
        methods=["POST"],
        name=f"submit_{collection}",
        status_code=status.HTTP_202_ACCEPTED,
        response_model=JobView,
        responses=documented(*SUBMIT_ERRORS),
        openapi_extra=bodies.documented_body(body, columnar=True),
        description=description,
    )


def add_job_routes(router: APIRouter, collection: str, noun: str) -> None:
    """`GET /{collection}/{job_id}` (with long-wait), `GET …/events` and `DELETE` on `router`."""
    path = f"/{collection}/{{job_id}}"
    article = "An" if noun[0] in "aeiou" else "A"
    router.add_api_route(
        path,
        get_job,
        methods=["GET"],
        response_model=JobView,
        responses=documented("unauthorized", "missing-scope", "unknown-job", "redis-unavailable"),
        summary=f"{article} {noun}'s status and results; with `wait`, answer as soon as it finishes",
        openapi_extra=deps.read_by_hand("wait"),
    )
    router.add_api_route(
        f"{path}/events",
        job_events,
        methods=["GET"],
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {"example": STREAM_EXAMPLE}}, "description": "Server-Sent Events."},
            **documented("unauthorized", "missing-scope", "unknown-job", "redis-unavailable"),
        },
        summary=f"A Server-Sent Events stream of the {noun}'s changes, ending with its result",
    )
    router.add_api_route(
        path,
        cancel_job,
        methods=["DELETE"],
        response_model=JobView,
        responses={
            202: {"model": JobView, "description": "Running: it stops at its next batch."},
            **documented("unauthorized", "missing-scope", "unknown-job", "job-finished", "redis-unavailable"),
        },
        summary=f"Cancel {article.lower()} {noun}",
    )
