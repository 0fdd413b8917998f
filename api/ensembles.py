"""Ensembles (ENSEMBLES): virtual models whose answer combines the forecasts of their members.

A synchronous call (`POST /v1/predict`) to an ensemble submits one job per member model, all at
once (each on its sync lane when the member is sync-eligible, else on its bulk queue, waited on
either way; each may fall back as a call to that model would), waits for them together, and
combines their results series by series: the median or the mean of each row (mean, each
quantile level) across members. The combination is computed per quantile level, so it is a
combination of quantiles, not the quantile of a mixture. With `parameters.ensemble_members` the
answer also holds each member's own forecast (`members`). A member that fails, is cancelled or
is not done in time fails the call (and the other members still running are cancelled), unless
`parameters.ensemble_partial` lets the others answer without it (at least one must succeed).
The answer is not stored as a job of its own: its `id` names nothing to poll; the members are
jobs, listed with their ids.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import msgspec
import numpy as np
import orjson
from fastapi import Request, Response

from shared.store import JobRecord, JobStatus, Lane

from api import render
from api.answers import answer
from api.bodies import ForecastJob
from api.problems import Problem
from api.routing import Ensemble
from api.service import JobService

_COMBINE: dict[str, Callable[..., np.ndarray]] = {"median": np.median, "mean": np.mean}


async def predict(
    jobs: JobService, ensemble: Ensemble, job: ForecastJob, owner: str, wait_s: float, request: Request
) -> Response:
    """The ensemble's forecast of `job`'s series, as `/v1/predict` answers a model's."""
    params = job.parameters
    if params.return_samples:
        raise Problem(
            422, "not-sample-based", "parameters.return_samples: an ensemble combines quantiles, not sample paths",
            field="parameters.return_samples",
        )  # fmt: skip
    member_params = params.model_copy(update={"ensemble_members": False, "ensemble_partial": False})
    outcomes = await asyncio.gather(
        *(_run(jobs, ForecastJob(spec.id, member_params, job.series, None, job.nested), owner, wait_s)
          for spec in ensemble.members),
        return_exceptions=True,
    )  # fmt: skip
    records = [outcome for outcome in outcomes if isinstance(outcome, JobRecord)]
    done = [record for record in records if record.status is JobStatus.SUCCEEDED]
    if not params.ensemble_partial or not done:
        missing = [outcome for outcome in outcomes if not isinstance(outcome, JobRecord) or outcome not in done]
        if missing:
            await _cancel(jobs, [record for record in records if not record.terminal], owner)
            raise _why(ensemble, missing)
    results = [await jobs.results(record) for record in done]
    layout = render.layout(done[0], results[0][0][0] if results[0][0] else None)
    combine = _COMBINE[ensemble.combine]
    combined = [
        combine(np.stack([layout.array(outputs[i]) for outputs, _ in results]), axis=0).astype(np.float32).tobytes()
        for i in range(len(job.series))
    ]
    record = JobRecord(
        id=uuid.uuid4().hex, model=ensemble.name, status=JobStatus.SUCCEEDED, lane=Lane.SYNC,
        n_series=len(job.series), prediction_length=params.prediction_length,
        created_at=min(r.created_at for r in done), started_at=min(r.started_at or r.created_at for r in done),
        finished_at=max(r.finished_at or r.created_at for r in done), progress_done=len(job.series),
        weights=_weights(done), request={"parameters": member_params.model_dump(mode="json")},
    )  # fmt: skip
    headers = {"Served-By": ensemble.name}
    if not params.ensemble_members:
        items = results[0][1]
        record.results = (combined, msgspec.msgpack.encode(items) if items is not None else None)
        return await answer(jobs, record, request, Response(headers=headers))
    view = orjson.loads(render.job_json(record, combined, results[0][1]))
    view["members"] = [
        {"model": member.requested or member.model, "served_by": member.model, "job_id": member.id,
         "predictions": render.predictions(member, outputs, items)}
        for member, (outputs, items) in zip(done, results, strict=True)
    ]  # fmt: skip
    body = orjson.dumps(view, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    return Response(body, headers=headers, media_type="application/json")


async def _run(jobs: JobService, member: ForecastJob, owner: str, wait_s: float) -> JobRecord:
    """One member's job, submitted and waited on (the route admitted the caller once for all)."""
    spec = jobs.fleet.model(member.model)
    lane = Lane.SYNC if jobs.settings.sync_eligible(spec) else Lane.ASYNC
    record, _ = await jobs.submit_and_wait(member, lane, owner, wait_s, waited=True, admitted=True)
    return record


async def _cancel(jobs: JobService, records: list[JobRecord], owner: str) -> None:
    for record in records:
        try:
            await jobs.cancel(record.id, owner)
        except Problem:  # it ended meanwhile
            pass


def _why(ensemble: Ensemble, missing: list) -> Problem:
    """The refusal for the first member that did not answer: its own problem, or what became of its job."""
    first = missing[0]
    if isinstance(first, BaseException):
        if isinstance(first, Problem):
            return first
        raise first  # not a refusal: an error of ours, answered as any other
    ids = {"job_id": first.id, "ensemble": ensemble.name}
    if first.status is JobStatus.FAILED:
        return Problem(500, "forecast-failed", f"{first.model}: {first.error or 'the forecast failed'}", **ids)
    if first.terminal:
        return Problem(409, f"job-{first.status.value}", f"{first.model}'s job {first.id} was {first.status.value}",
                       **ids)  # fmt: skip
    return Problem(
        504, "forecast-timeout", f"{first.model}'s job {first.id} was not done in time; the ensemble's jobs were "
        "cancelled", **ids,
    )  # fmt: skip


def _weights(records: list[JobRecord]) -> str | None:
    kinds = {record.weights for record in records}
    return kinds.pop() if len(kinds) == 1 else "mixed"
