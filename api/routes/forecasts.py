"""Native forecast jobs: submit, poll or long-wait, cancel, and the synchronous predict."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from shared.schemas import ForecastRequest, JobView
from shared.store import Lane

from api import answers, bodies, deps, ensembles
from api.answers import accepted, add_job_routes, answer, preferred_wait
from api.auth import owner_of
from api.hot import hot
from api.problems import SUBMIT_ERRORS, documented

router = APIRouter(prefix="/v1", tags=["forecasts"])

# What a synchronous predict can answer besides a submission's refusals.
SYNC_ERRORS = ("not-sync-eligible", "job-cancelled", "forecast-failed")


@router.post(
    "/forecasts",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses={
        200: {"model": JobView, "description": "With `Prefer: wait`: the job ended within the wait."},
        **documented(*SUBMIT_ERRORS),
    },
    openapi_extra=bodies.documented_body(ForecastRequest, columnar=True)
    | deps.read_by_hand("Idempotency-Key", "Prefer"),
)
@hot
async def submit_forecast(request: Request, response: Response) -> Response:
    """Queue a forecast job on its model's queue; poll or long-wait on the returned id.

    The body is JSON, or an Arrow IPC stream / Parquet file in long format with the parameters in
    the query string. With an `Idempotency-Key`, sending the same request again returns the same
    job (`Idempotent-Replayed: true`) instead of queueing another. `X-Workers-Online` counts the
    model's live workers: with 0 the job is queued until one starts. With `Prefer: wait=<seconds>`
    (RFC 7240; capped at WAIT_MAX_S) the answer waits for the job like a long-wait GET: 200 with the
    results when it ends in time, else 202 as usual. One request per job instead of two.
    """
    # A hot route: it reads its dependencies itself (api/deps.py).
    jobs, owner = deps.jobs_of(request), owner_of(request)
    idempotency_key, prefer = deps.read(request, "Idempotency-Key"), deps.read(request, "Prefer")
    await jobs.admission.admit(owner)  # the key is checked and its rate taken before any of the body is read
    job = await bodies.forecast(request, jobs.settings)
    wait = preferred_wait(prefer, jobs.settings.wait_max_s)
    ensemble = jobs.router.ensemble(job.model)
    if ensemble is not None:  # a virtual model: a job per member, combined when read (api/ensembles.py)
        record, replayed = await ensembles.submit(jobs, ensemble, job, Lane.ASYNC, owner), False
        if wait:
            record = await jobs.wait(record.id, wait, owner)
    elif wait:
        record, replayed = await jobs.submit_and_wait(job, Lane.ASYNC, owner, wait, idempotency_key, admitted=True)
    else:
        record, replayed = await jobs.submit(job, Lane.ASYNC, owner, idempotency_key, admitted=True)
    await accepted(response, jobs.fleet, record, replayed)
    if wait:
        response.headers["Preference-Applied"] = f"wait={wait:g}"
        if record.terminal:
            response.status_code = status.HTTP_200_OK
    return await answer(jobs, record, request, response)


add_job_routes(router, "forecasts", "forecast job")


@router.post(
    "/predict",
    response_model=JobView,
    responses={
        202: {"model": JobView, "description": "Timed out; the job continues, poll its id."},
        **documented(*SUBMIT_ERRORS, *SYNC_ERRORS),
    },
    openapi_extra=bodies.documented_body(ForecastRequest, columnar=True)
    | deps.read_by_hand("timeout", "Idempotency-Key"),
)
@hot
async def predict(request: Request, response: Response) -> Response:
    """Forecast in one round trip on a sync-eligible model, through its priority lane; or on an
    ensemble (ENSEMBLES), whose members' forecasts are combined.

    On timeout the answer is 202 with the job's id and a Location to poll: the job keeps running.
    """
    return await answers.predict(request, response)
