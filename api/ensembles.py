"""Ensembles (ENSEMBLES): virtual models whose answer combines the forecasts of their members.

A request to an ensemble submits one job per member model, all at once, and records the
ensemble's own job, which holds its members' ids and is in no queue. Its state is read from its
members' each time it is read (`settle`, called by `JobService.require`): queued while all are,
succeeded once all did, and then its predictions are the members' combined series by series,
the median or the mean of each row (mean, each quantile level) across members: a combination of
quantiles, not the quantile of a mixture. A member that fails, is cancelled or expires fails the
ensemble (its members still running are cancelled), unless `parameters.ensemble_partial` lets
the others answer without it (at least one must succeed); a member refused at submission (no
live worker, …) refuses the request with its own problem, unless `ensemble_partial` drops it
too. With `parameters.ensemble_members` the answer also lists each member (`members`: model,
served_by, job_id, status, predictions). Cancelling the ensemble's job cancels its members.

On `/v1/predict` the members run on their sync lanes when sync-eligible (else on their bulk
queues), each needs a live worker (or a fallback, as a call to that model would), and the call
waits on the members themselves. On `/v1/forecasts` they are queued like any async job, and a
long-wait on the ensemble's job re-reads it every second (its members' completions are
announced under their own ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from shared.store import JobRecord, JobStatus, Lane

from api import render
from api.bodies import ForecastJob
from api.problems import Problem
from api.routing import Ensemble

if TYPE_CHECKING:  # the service reads an ensemble's job through `settle`
    from api.service import JobService

_COMBINE: dict[str, Callable[..., np.ndarray]] = {"median": np.median, "mean": np.mean}
# A waiter re-reads the members at least this often, so a missed wake-up only delays it.
_RECHECK_S = 1.0


async def submit(jobs: JobService, ensemble: Ensemble, job: ForecastJob, lane: Lane, owner: str) -> JobRecord:
    """Submit a job per member and record the ensemble's; returns the ensemble's job as it stands.
    Nothing is kept when a member is refused: the members already submitted are cancelled."""
    params = job.parameters
    if params.return_samples:
        raise Problem(
            422, "not-sample-based", "parameters.return_samples: an ensemble combines quantiles, not sample paths",
            field="parameters.return_samples",
        )  # fmt: skip
    if job.callback_url:
        raise Problem(422, "callback-not-allowed", "callback_url: not taken for ensembles", field="callback_url")
    member_params = params.model_copy(update={"ensemble_members": False, "ensemble_partial": False})
    submitted = await asyncio.gather(
        *(_submit(jobs, ForecastJob(spec.id, member_params, job.series, None, job.nested), lane, owner)
          for spec in ensemble.members),
        return_exceptions=True,
    )  # fmt: skip
    members = [outcome for outcome in submitted if isinstance(outcome, JobRecord)]
    refusals = [(spec, outcome) for spec, outcome in zip(ensemble.members, submitted, strict=True)
                if isinstance(outcome, BaseException)]  # fmt: skip
    if refusals and not (params.ensemble_partial and members and all(isinstance(r, Problem) for _, r in refusals)):
        await _cancel(jobs, [member for member in members if not member.terminal], owner)
        raise refusals[0][1]
    record = JobRecord(
        id=uuid.uuid4().hex, model=ensemble.name, status=JobStatus.QUEUED, lane=lane, n_series=len(job.series),
        prediction_length=params.prediction_length, created_at=time.time(), owner=owner,
        request={"parameters": params.model_dump(mode="json")},
        ensemble={"combine": ensemble.combine, "members": [member.id for member in members],
                  "partial": params.ensemble_partial, "listed": params.ensemble_members,
                  "refused": [{"model": spec.id, "status": "refused", "error": str(why)} for spec, why in refusals]},
    )  # fmt: skip
    await jobs.store.create_ensemble(record)
    return await settle(jobs, record, members)


async def predict(jobs: JobService, ensemble: Ensemble, job: ForecastJob, owner: str, wait_s: float) -> JobRecord:
    """`submit` on the sync lane, then wait up to `wait_s` for the ensemble's job to end, woken by
    its members' completions."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    record = await submit(jobs, ensemble, job, Lane.SYNC, owner)
    assert record.ensemble is not None
    if record.terminal:
        return record
    with contextlib.ExitStack() as stack:
        wakeups = [stack.enter_context(jobs.events.watch(member)) for member in record.ensemble["members"]]
        while True:
            for wakeup in wakeups:
                wakeup.clear()
            # Read once watched: a member that ended before its wake-up was watched is seen here.
            record = await jobs.require(record.id, owner)
            remaining = deadline - loop.time()
            if record.terminal or remaining <= 0:
                return record
            waiters = [asyncio.ensure_future(wakeup.wait()) for wakeup in wakeups]
            await asyncio.wait(waiters, timeout=min(remaining, _RECHECK_S), return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()


async def settle(jobs: JobService, record: JobRecord, members: list[JobRecord] | None = None) -> JobRecord:
    """The ensemble's job with the state its members give it (read now unless given), and once it
    succeeded its combined results (`record.results`) and, when asked for, its members."""
    assert record.ensemble is not None
    ids: list[str] = record.ensemble["members"]
    if members is None:
        found = await asyncio.gather(*(jobs.store.get(member, with_results=True) for member in ids))
    else:
        found = list(members)
    live = [member for member in found if member is not None and not member.terminal]
    if record.status is JobStatus.CANCELLED:  # cancelled as a whole (JobService.cancel)
        await _cancel(jobs, live, record.owner)
        return record
    done = [member for member in found if member is not None and member.status is JobStatus.SUCCEEDED]
    lost = [(ids[i], member) for i, member in enumerate(found) if member is None or member.status in _LOST]
    record.progress_done = min((member.progress_done if member else 0) for member in found)
    started = [member.started_at for member in found if member is not None and member.started_at is not None]
    record.started_at = min(started) if started else None
    if lost and not (record.ensemble["partial"] and (done or live)):
        await _cancel(jobs, live, record.owner)
        record.status, record.finished_at = JobStatus.FAILED, time.time()
        record.error = "; ".join(_why(member_id, member) for member_id, member in lost)
    elif not live:
        record.status = JobStatus.SUCCEEDED
        record.finished_at = max(member.finished_at or member.created_at for member in done)
        record.weights = _weights(done)
        record.results = await _combined(jobs, record, done)
    elif started:
        record.status = JobStatus.RUNNING
    if record.ensemble["listed"]:
        record.members = [await _member(jobs, member_id, member) for member_id, member in zip(ids, found, strict=True)]
        record.members += record.ensemble["refused"]
    return record


_LOST = (JobStatus.FAILED, JobStatus.CANCELLED)


async def _combined(jobs: JobService, record: JobRecord, done: list[JobRecord]) -> tuple[list[bytes], bytes | None]:
    """The members' results combined series by series (one float32 element each), and the items."""
    results = [await jobs.results(member) for member in done]
    layout = render.layout(done[0], results[0][0][0] if results[0][0] else None)
    combine = _COMBINE[record.ensemble["combine"] if record.ensemble else "median"]
    combined = [
        combine(np.stack([layout.array(outputs[i]) for outputs, _ in results]), axis=0).astype(np.float32).tobytes()
        for i in range(record.n_series)
    ]
    items = results[0][1]
    return combined, msgspec.msgpack.encode(items) if items is not None else None


async def _member(jobs: JobService, member_id: str, member: JobRecord | None) -> dict:
    if member is None:
        return {"job_id": member_id, "status": "expired"}
    shown: dict = {"model": member.requested or member.model, "served_by": member.model, "job_id": member.id,
                   "status": member.status.value}  # fmt: skip
    if member.status is JobStatus.SUCCEEDED:
        outputs, items = await jobs.results(member)
        shown["predictions"] = render.predictions(member, outputs, items)
    elif member.error:
        shown["error"] = member.error
    return shown


async def _submit(jobs: JobService, member: ForecastJob, lane: Lane, owner: str) -> JobRecord:
    """One member's job (the route admitted the caller once for all): on a sync call, on the member's
    sync lane when it has one, and refused without a live worker, as a call to that model would be."""
    spec = jobs.fleet.model(member.model)
    waited = lane is Lane.SYNC
    if waited and not jobs.settings.sync_eligible(spec):
        lane = Lane.ASYNC
    record, _ = await jobs.submit(member, lane, owner, waited=waited, admitted=True)
    return record


async def _cancel(jobs: JobService, records: list[JobRecord], owner: str) -> None:
    for record in records:
        with contextlib.suppress(Problem):  # it ended meanwhile
            await jobs.cancel(record.id, owner)


def _why(member_id: str, member: JobRecord | None) -> str:
    if member is None:
        return f"member job {member_id} expired"
    if member.status is JobStatus.FAILED:
        return f"{member.model} (job {member.id}) failed: {member.error or 'no error recorded'}"
    return f"{member.model} (job {member.id}) was {member.status.value}"


def _weights(records: list[JobRecord]) -> str | None:
    kinds = {record.weights for record in records}
    return kinds.pop() if len(kinds) == 1 else "mixed"
