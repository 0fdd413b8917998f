"""The job lifecycle, as plain async functions over the job store and Celery (callable without HTTP):
submit (validate, admit, record, enqueue), wait, follow, cancel, read results."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial

import msgspec

from shared import cache, catalog, families
from shared.celery_app import task_message
from shared.schemas import AnomalyParameters, BacktestRequest, FinetuneParameters, ForecastRequest
from shared.series import SeriesSet
from shared.series import identity as series_identity
from shared.settings import Settings
from shared.store import AsyncJobStore, JobKind, JobRecord, JobStatus, Lane, answered, keys

from api import callbacks, ensembles, limits, render
from api.admission import Admission
from api.bodies import ForecastJob, forecast_job, series_from_inputs
from api.events import Announcement, JobEvents, woken
from api.fleet import Fleet
from api.metrics import ApiMetrics
from api.problems import Problem
from api.routing import Router, Routes
from api.sender import SHARED_MAX_SERIES, Sender

log = logging.getLogger(__name__)

# Series bytes past which the result cache is read before the job is created rather than by the
# create script (see `submit`).
CACHE_LOOKUP_FIRST_BYTES = 64 << 10

# A waiter re-reads the record at least this often, so a lost pub/sub message only delays it.
_RECHECK_S = 1.0


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: AsyncJobStore,
        events: JobEvents,
        metrics: ApiMetrics,
    ):
        self.settings, self.store = settings, store
        self.events, self.metrics = events, metrics
        routes = Routes.from_settings(settings)  # FALLBACKS, AB_SPLITS, ENSEMBLES, parsed once
        self.fleet = Fleet(settings, store, routes.ensembles)
        self.router = Router(settings, self.fleet, store, metrics, routes)
        self.admission = Admission(settings, store)
        self.sender = Sender(
            store.client, settings.send_window_ms / 1000, settings.send_max_jobs, settings.send_busy_window_ms / 1000,
            settings.send_saturated_window_ms / 1000,
        )  # fmt: skip

    async def submit(
        self,
        job: ForecastJob,
        lane: Lane,
        owner: str,
        idempotency_key: str | None = None,
        waited: bool = False,
        admitted: bool = False,
        job_id: str | None = None,
        awaited: bool = False,
    ) -> tuple[JobRecord, bool]:
        """Validate, admit (unless the route `admitted` the owner before reading the body), record the
        job (as `job_id` when given) and enqueue it on its model's queue.

        Returns the job and whether it is an earlier job replayed for the same `idempotency_key`.
        A job someone will wait on (`waited`, and every sync job) needs a live worker of its model.
        `awaited`: the caller waits for the job's end (`submit_and_wait`), which then comes with its
        answer on this process's answers channel (`JobRecord.awaited`).
        """
        spec, finetuned = await self.fleet.resolve(job.model, owner)
        if finetuned:
            # A fine-tuned model is its owner's: no chain, split or ensemble names it; its base
            # model's workers serve it.
            limits.check(job.series, job.parameters, spec, self.settings, job.field)
            if lane is Lane.SYNC:
                self.fleet.check_sync(spec)
            if waited or lane is Lane.SYNC:
                await self.fleet.serving(spec)
            requested = spec.id
        else:
            spec = await self.router.choose(job, lane, waited)  # the model asked for, or a fallback or A/B arm
            requested = self.fleet.model(job.model).id
        callbacks.check_url(job.callback_url, self.settings)
        request = {"parameters": job.parameters.model_dump(mode="json"), **_variant(finetuned)}
        return await self._enqueue(
            spec, lane, owner, idempotency_key, request, job.series, job.nested,
            job.parameters.prediction_length, callback_url=job.callback_url, admitted=admitted, job_id=job_id,
            requested=requested if requested != spec.id else None, awaited=awaited,
        )  # fmt: skip

    async def submit_backtest(
        self, request: BacktestRequest, owner: str, idempotency_key: str | None = None, admitted: bool = False
    ) -> tuple[JobRecord, bool]:
        """A backtest is one job on the model's bulk queue: every origin's forecast, then the scores."""
        spec, finetuned = await self.fleet.resolve(request.model, owner)
        series = series_from_inputs([request.series])
        limits.check_backtest(request, series, spec, self.settings)
        await self.router.pinned(spec, request.parameters.weights_revision)
        callbacks.check_url(request.callback_url, self.settings)
        stored = {**request.model_dump(mode="json", exclude={"model", "callback_url", "series"}), **_variant(finetuned)}
        n_origins = len(request.origins.values())
        return await self._enqueue(
            spec, Lane.ASYNC, owner, idempotency_key, stored, series, None, request.parameters.prediction_length,
            kind=JobKind.BACKTEST, callback_url=request.callback_url, n_series=n_origins, admitted=admitted,
        )  # fmt: skip

    async def submit_anomalies(
        self,
        job: ForecastJob[AnomalyParameters],
        owner: str,
        idempotency_key: str | None = None,
        admitted: bool = False,
    ) -> tuple[JobRecord, bool]:
        """An anomaly job is one job on the model's bulk queue: a forecast of every scored point (or
        every `horizon` points) of every series, then the intervals and flags. The first scored
        point of each series is settled here and stored with the job, so the worker applies it as is."""
        spec, finetuned = await self.fleet.resolve(job.model, owner)
        starts, windows = limits.check_anomalies(job.series, job.parameters, spec, self.settings)
        callbacks.check_url(job.callback_url, self.settings)
        request = {"parameters": job.parameters.model_dump(mode="json"), "starts": starts, **_variant(finetuned)}
        return await self._enqueue(
            spec, Lane.ASYNC, owner, idempotency_key, request, job.series, None, job.parameters.horizon,
            kind=JobKind.ANOMALY, callback_url=job.callback_url, n_series=windows, admitted=admitted,
        )  # fmt: skip

    async def submit_finetune(
        self,
        job: ForecastJob[FinetuneParameters],
        owner: str,
        idempotency_key: str | None = None,
        admitted: bool = False,
    ) -> tuple[JobRecord, bool]:
        """A fine-tuning job goes to its base model's training queue; its progress counts steps."""
        spec = self.fleet.model(job.model)
        limits.check_finetune(job.series, job.parameters, spec, self.settings)
        callbacks.check_url(job.callback_url, self.settings)
        request = {"parameters": job.parameters.model_dump(mode="json")}
        return await self._enqueue(
            spec, Lane.TRAIN, owner, idempotency_key, request, job.series, None, job.parameters.prediction_length,
            kind=JobKind.FINETUNE, callback_url=job.callback_url, n_series=job.parameters.num_steps, admitted=admitted,
        )  # fmt: skip

    async def _enqueue(
        self,
        spec: catalog.ModelSpec,
        lane: Lane,
        owner: str,
        idempotency_key: str | None,
        request: dict,
        series: SeriesSet,
        nested: list[bool] | None,
        prediction_length: int,
        kind: JobKind = JobKind.FORECAST,
        callback_url: str | None = None,
        n_series: int | None = None,
        admitted: bool = False,
        job_id: str | None = None,
        requested: str | None = None,
        awaited: bool = False,
    ) -> tuple[JobRecord, bool]:
        if not admitted:
            await self.admission.admit(owner)

        now = time.time()
        identity = series_identity(series, {"kind": kind.value, **request})
        record = JobRecord(
            id=job_id or uuid.uuid4().hex, model=spec.id, status=JobStatus.QUEUED, lane=lane,
            n_series=len(series) if n_series is None else n_series, prediction_length=prediction_length,
            created_at=now, owner=owner, requested=requested, kind=kind, request=request,
            # The result cache is per API key unless CACHE_SCOPE=global: a hit would tell a key that
            # another one sent the same series.
            identity=identity if self.settings.cache_scope == "global" else f"{owner}:{identity}",
            callback_url=callback_url, callback_status="pending" if callback_url else None,
            awaited=self.events.channel if awaited else None,
        )  # fmt: skip
        # Of the model asked for: a retry with the same Idempotency-Key replays its job even when a
        # fallback served it, and identical requests share one job whichever model serves it.
        digest = _digest(f"{lane.value}\0{requested or spec.id}\0{identity}")
        idempotency = (_digest(idempotency_key), f"{record.id} {digest}") if idempotency_key else None
        items = _items(series, nested)
        # A fine-tuning run is never shared: each makes a model of its own.
        cacheable = kind is not JobKind.FINETUNE and families.of(spec).cacheable(request["parameters"])
        cached = await self._cache_digest(spec, record.identity) if cacheable else None
        # Single-flight: while a job for a request is queued or running, the same owner's identical
        # request attaches to it instead of queueing another, so a client that retries after a
        # timeout waits on its first job. Only for answers that do not depend on which job computes
        # them (what the cache may answer); a request with an Idempotency-Key follows its key, and
        # one with a callback_url asked for its own delivery. Decided in the creating script, so two
        # identical requests racing cannot both miss each other.
        flight = digest if not idempotency and not callback_url and cacheable else None
        max_in_flight = self.admission.limits(owner).max_in_flight
        small = kind is JobKind.FORECAST and record.n_series <= SHARED_MAX_SERIES
        pinned = request.get("parameters", {}).get("weights_revision")
        alone = self.sender.alone(spec, lane, small, keys.revision_queue(spec, pinned) if pinned else None)
        message = (alone, task_message([record.id], alone)) if alone else None
        inputs = series.encode()
        # The create script looks the result cache up itself: a request it cannot answer costs one
        # round trip, not two. A large body's entry is read first instead, so that a hit does not
        # send the series to Redis only for the script to delete them.
        large = sum(map(len, inputs)) > CACHE_LOOKUP_FIRST_BYTES
        hit, outcome, sent = None, None, None
        if cached is not None and large:
            hit = await self.store.cached(cached)
        if hit is None:
            lookup = None if large else cached
            create = partial(
                self.store.create, spec, record, inputs, items, max_in_flight, idempotency, flight, lookup, message
            )
            if message is None:  # created with the other jobs of its model's next shared message
                saturated = await self.fleet.saturated(spec)
                outcome, sent = await self.sender.create(spec, record.id, create, saturated)
            else:
                outcome = await create()
            if lookup is not None and outcome is not None and outcome.startswith("cached:"):
                hit = json.loads(outcome.removeprefix("cached:"))
        if hit is not None and cached is not None:
            from_cache = replace(
                record, status=JobStatus.SUCCEEDED, started_at=now, finished_at=now, cached=True, inference_s=0.0,
                awaited=None,  # ended already: no worker will answer it
                weights=hit.get("weights"), backtest=hit.get("backtest"),
                progress_done=int(hit.get("progress_done", 0)),
            )  # fmt: skip
            outcome = await self.store.create_done(from_cache, cached, items, idempotency)
            if outcome == "miss":  # the cached result expired just now: the job runs
                hit = None
                outcome = await self.store.create(
                    spec, record, inputs, items, max_in_flight, idempotency, flight, message=message
                )
            else:
                record = from_cache
        if outcome is not None and outcome.startswith("joined:"):
            earlier = outcome.removeprefix("joined:")
            log.info("%s for %s attached to the same request's job %s, in flight", kind.value, spec.id, earlier)
            return await self.require(earlier, owner), False
        if outcome is not None:
            return await self._refused_or_replayed(outcome, digest, owner, idempotency, spec, lane)
        if hit is not None:
            log.info("%s %s answered from the result cache: %s", kind.value, record.id, spec.id)
            self.metrics.accepted.labels(spec.id, "cached").inc()
            return record, False

        if message is None:  # created; its message is shared with the model's other small jobs
            try:
                # Shielded: a request that goes away must not cancel its neighbours' send.
                await (asyncio.shield(sent) if sent is not None else self.sender.send(spec, record.id))
            except Exception as exc:
                log.error("enqueue of job %s failed: %s", record.id, exc)
                error = f"could not be enqueued ({type(exc).__name__}); its request was answered 503"
                await self.store.fail_unsent(spec, record, error, idempotency[0] if idempotency else None)
                raise Problem(
                    503, "broker-unavailable", "could not enqueue the job; retry", headers={"Retry-After": "1"}
                ) from exc
        log.debug("%s %s accepted: %s, %d series, lane %s", kind.value, record.id, spec.id, record.n_series, lane.value)
        self.metrics.accepted.labels(spec.id, lane.value).inc()
        return record, False

    async def _cache_digest(self, spec: catalog.ModelSpec, identity: str) -> str | None:
        """The result cache entry an identical earlier request's result would be kept under, if the
        model's workers agree on one weights revision and the request is deterministic (see
        shared/cache.py); None when nothing can be cached."""
        if not self.settings.cache_ttl_s:
            return None
        revision = await self.fleet.revision(spec)
        return cache.digest(spec, revision, identity) if revision is not None else None

    async def results(self, record: JobRecord) -> tuple[list[bytes], list | None]:
        """A succeeded job's output elements (one per series or origin) and its items (ids, starts, shapes)."""
        outputs, items = record.results if record.results is not None else await self.store.results(record.id)
        return outputs, (msgspec.msgpack.decode(items) if items else None)

    async def with_predictions(self, record: JobRecord) -> JobRecord:
        """The record with its predictions (or backtest forecasts) as Python lists: for small answers
        that other shapes are built from (the compat routes)."""
        if record.status is JobStatus.SUCCEEDED:
            outputs, items = await self.results(record)
            render.attach(record, outputs, items)
        return record

    async def _refused_or_replayed(
        self, outcome: str, digest: str, owner: str, idempotency: tuple[str, str] | None, spec: catalog.ModelSpec,
        lane: Lane,
    ) -> tuple[JobRecord, bool]:  # fmt: skip
        if outcome.startswith("in-flight:"):
            raise self.admission.too_many_in_flight(owner, outcome.split(":")[1])
        if outcome.startswith("queue-full:"):
            raise self.admission.queue_full(spec, lane)
        earlier_id, earlier_digest = outcome.split(" ", 1)
        if earlier_digest != digest:
            raise Problem(
                422,
                "idempotency-key-reused",
                "this Idempotency-Key was used with a different request; use a new key for a new request",
                field="Idempotency-Key",
                job_id=earlier_id,
            )
        try:
            return await self.require(earlier_id, owner), True
        except Problem:  # the earlier job's record expired: the key names nothing any more
            if idempotency:
                await self.store.forget_idempotency(owner, idempotency[0])
            raise Problem(
                404, "unknown-job", f"the job this Idempotency-Key named ({earlier_id}) expired; use a new key"
            ) from None

    async def run(
        self,
        request: ForecastJob | ForecastRequest,
        lane: Lane,
        owner: str,
        timeout_s: float,
        idempotency_key: str | None = None,
        with_results: bool = True,
        admitted: bool = False,
    ) -> JobRecord:
        """Submit and wait: the succeeded record, or the job as it stands when `timeout_s` runs out.

        A job that failed or was cancelled meanwhile is a problem response carrying its id; with no
        worker of the model online the answer is 503 at once, not a wait for nothing.
        """
        job = request if isinstance(request, ForecastJob) else forecast_job(request)
        record, _ = await self.submit_and_wait(job, lane, owner, timeout_s, idempotency_key, True, admitted)
        unless_succeeded(record)
        return await self.with_predictions(record) if with_results else record

    async def submit_and_wait(
        self, job: ForecastJob, lane: Lane, owner: str, wait_s: float, idempotency_key: str | None = None,
        waited: bool = False, admitted: bool = False,
    ) -> tuple[JobRecord, bool]:  # fmt: skip
        """`submit`, then `wait` up to `wait_s`. The wake-up is subscribed to before the job's message is
        sent, so the job just created is not read back before anything could have changed it: its first
        read is the one that finds it ended (one round trip less per waited job)."""
        job_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        with self.events.watch(job_id) as announced:
            record, replayed = await self.submit(
                job, lane, owner, idempotency_key, waited, admitted, job_id, awaited=True
            )
            if record.terminal:  # answered from the cache, or an ended job replayed
                return record, replayed
            if record.id == job_id:  # not an earlier job (replayed, or joined in flight) that may have moved on
                await woken(announced, max(0.0, min(deadline - loop.time(), _RECHECK_S)))
                ended = _answered(announced, owner)
                if ended is not None:
                    return ended, replayed
        return await self.wait(record.id, max(0.0, deadline - loop.time()), owner), replayed

    async def require(self, job_id: str, owner: str, with_results: bool = False, awaited: bool = False) -> JobRecord:
        """The job's record; 404 when there is none or it belongs to another owner (same answer for both).
        The record is small: results live in their own list, read with it when asked (`with_results`,
        one round trip for an answer) or later (`results`), and never given to another owner.
        `awaited`: the caller waits for the job's end, which then comes with its answer."""
        record = await self.store.get(job_id, with_results, (owner, self.events.channel) if awaited else None)
        if record is None or record.owner != owner:
            raise _unknown_job(job_id)
        if record.ensemble is not None:  # its state is its members'
            return await ensembles.settle(self, record)
        return record

    async def wait(self, job_id: str, timeout_s: float, owner: str) -> JobRecord:
        """The job's record as soon as it is terminal, or as it stands when `timeout_s` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self.events.watch(job_id) as announced:
            while True:
                announced.clear()
                record = await self.require(job_id, owner, with_results=True, awaited=deadline > loop.time())
                remaining = deadline - loop.time()
                if record.terminal or remaining <= 0:
                    return record
                await woken(announced, min(remaining, _RECHECK_S))
                ended = _answered(announced, owner)
                if ended is not None:
                    return ended

    async def changes(self, job_id: str, owner: str, keepalive_s: float = 15.0) -> AsyncIterator[JobRecord | None]:
        """The job's record now and at each change of status or progress, ending with its terminal
        state; None every `keepalive_s` without a change (a stream sends a comment to stay open)."""
        loop = asyncio.get_running_loop()
        last: tuple | None = None
        quiet_since = loop.time()
        with self.events.watch(job_id) as announced:
            while True:
                announced.clear()
                record = await self.require(job_id, owner)
                state = (record.status, record.progress_done, record.cancel_requested)
                if state != last:
                    last, quiet_since = state, loop.time()
                    yield record
                    if record.terminal:
                        return
                elif loop.time() - quiet_since >= keepalive_s:
                    quiet_since = loop.time()
                    yield None
                await woken(announced, _RECHECK_S)

    async def inspect(self, job_id: str) -> JobRecord:
        """Any owner's job, without its results (an `admin` key's view); 404 when there is none."""
        record = await self.store.get(job_id)
        if record is None:
            raise _unknown_job(job_id)
        return record

    async def cancel(self, job_id: str, owner: str, any_owner: bool = False) -> tuple[JobRecord, bool]:
        """Cancel a job that has not finished (`any_owner`: whoever owns it, for an `admin` key);
        returns its record and whether it stopped already."""
        if any_owner and (found := await self.store.get(job_id)) is not None:
            owner = found.owner  # the cancel script updates the owner's in-flight set
        outcome = await self.store.cancel(job_id, owner)
        if outcome not in ("cancelled", "cancelling", "missing"):
            raise Problem(409, "job-finished", f"job {job_id} already {outcome}; nothing to cancel", status_now=outcome)
        return await self.require(job_id, owner), outcome == "cancelled"  # require answers 404 for 'missing'

    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.store.client.ping(), 1.0))
        except Exception:
            return False


def _answered(announced: Announcement, owner: str) -> JobRecord | None:
    """The ended job's record, with its results, when its answer came with its announcement (else
    None: the waiter reads the job)."""
    if announced.answer is None:
        return None
    try:
        record = answered(announced.answer)
    except Exception:  # an answer this code cannot read is no answer: the job is read instead
        log.exception("unreadable answer for job %s", announced.answer[0])
        return None
    return record if record is not None and record.owner == owner and record.terminal else None


def _unknown_job(job_id: str) -> Problem:
    return Problem(404, "unknown-job", f"no job {job_id!r} (never accepted, or its result expired)")


def unless_succeeded(record: JobRecord) -> None:
    """A waited-on job that failed or was cancelled is a problem answer carrying its id (a job still
    running, or succeeded, is not)."""
    if record.status is JobStatus.FAILED:
        raise Problem(500, "forecast-failed", record.error or "the forecast failed", job_id=record.id)
    if record.terminal and record.status is not JobStatus.SUCCEEDED:
        raise Problem(409, f"job-{record.status.value}", f"job {record.id} was {record.status.value}", job_id=record.id)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _variant(finetuned: str | None) -> dict:
    """What a job's stored request says of the fine-tuned model it asked for: the worker runs that
    variant of its base model, and the request identity (cache, single-flight) includes it."""
    return {"finetuned": finetuned} if finetuned else {}


def _items(series: SeriesSet, nested: list[bool] | None) -> bytes | None:
    """What rendering a job's answer needs besides the numbers: item ids, starts, which series came
    as a list of variates. None when every series is plain (nothing to store)."""
    if not any(series.item_ids) and not any(series.starts) and not nested:
        return None
    return msgspec.msgpack.encode(
        [
            [item, start, bool(nested and nested[i])]
            for i, (item, start) in enumerate(zip(series.item_ids, series.starts, strict=True))
        ]
    )
