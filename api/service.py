"""What the routes do, as plain async functions over Redis and Celery (callable without HTTP)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import NamedTuple

import redis.asyncio as aioredis
from celery import Celery

import msgspec

from shared import cache, catalog, families, keys
from shared.jobs import JobKind, JobRecord, JobStatus, Lane, Scripts, new_record, stored
from shared.schemas import BacktestRequest, ForecastRequest, ModelView, WorkerView
from shared.series import SeriesSet
from shared.series import identity as series_identity
from shared.settings import Settings

from api import callbacks, limits, render
from api.auth import LEGACY
from api.bodies import ForecastJob, forecast_job, series_from_inputs
from api.events import JobEvents
from api.flight import Flights
from api.metrics import ApiMetrics
from api.problems import Problem

log = logging.getLogger(__name__)

# A waiter re-reads the record at least this often, so a lost pub/sub message only delays it.
_RECHECK_S = 1.0


class JobService:
    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        raw: aioredis.Redis,
        celery: Celery,
        events: JobEvents,
        metrics: ApiMetrics,
    ):
        """`client` decodes replies as text; `raw` does not, for series and results (binary)."""
        self.settings, self.client, self.raw, self.celery = settings, client, raw, celery
        self.events, self.metrics = events, metrics
        self.scripts = Scripts(client)
        self.flights = Flights(client)
        self._heartbeats: dict[str, tuple[list[dict], float]] = {}  # model id -> (live workers, good until)

    # -- models -------------------------------------------------------------------------------

    def model(self, name: str) -> catalog.ModelSpec:
        spec = catalog.find(name)
        if spec is None:
            raise Problem(404, "unknown-model", f"unknown model {name!r}; GET /v1/models lists them", field="model")
        return spec

    async def models(self, specs: tuple[catalog.ModelSpec, ...] = catalog.CATALOG) -> list[ModelView]:
        """Catalog entries with live queue depths and the workers heard from recently (one round trip)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for spec in specs:
                pipe.llen(keys.queue(spec))
                pipe.llen(keys.sync_queue(spec))
                pipe.hgetall(keys.workers(spec))
            replies = await pipe.execute()
        views = []
        for i, spec in enumerate(specs):
            depth, sync_depth, heartbeats = replies[3 * i : 3 * i + 3]
            workers = [
                WorkerView(**{k: info[k] for k in WorkerView.model_fields if k in info})
                for info in self._live(heartbeats)
            ]
            kinds = {w.weights for w in workers}
            views.append(
                ModelView(
                    id=spec.id,
                    slug=spec.slug,
                    family=spec.family.value,
                    queue=keys.queue(spec),
                    sync_queue=keys.sync_queue(spec),
                    context_length=spec.context_length,
                    prediction_length=spec.prediction_length,
                    sample_based=families.of(spec).sample_based,
                    native_quantiles=list(spec.native_quantiles) if spec.native_quantiles else None,
                    sync_eligible=self.settings.sync_eligible(spec),
                    queue_depth=depth,
                    sync_queue_depth=sync_depth,
                    workers_online=len(workers),
                    weights=kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None),
                    workers=sorted(workers, key=lambda w: w.name),
                )
            )
        return views

    # -- jobs ---------------------------------------------------------------------------------

    async def submit(
        self,
        job: ForecastJob,
        lane: Lane,
        owner: str,
        idempotency_key: str | None = None,
        waited: bool = False,
        admitted: bool = False,
    ) -> tuple[JobRecord, bool]:
        """Validate, admit (unless the route `admitted` the owner before reading the body), record the
        job and enqueue it on its model's queue.

        Returns the job and whether it is an earlier job replayed for the same `idempotency_key`.
        A job someone will wait on (`waited`, and every sync job) needs a live worker of its model.
        """
        spec = self.model(job.model)
        limits.check(job.series, job.parameters, spec, self.settings)
        if lane is Lane.SYNC:
            self._check_sync(spec)
        if waited or lane is Lane.SYNC:
            await self.serving(spec)
        callbacks.check_url(job.callback_url, self.settings)
        request = {"parameters": job.parameters.model_dump(mode="json")}
        return await self._enqueue(
            spec, lane, owner, idempotency_key, request, job.series, job.nested,
            job.parameters.prediction_length, callback_url=job.callback_url, admitted=admitted,
        )  # fmt: skip

    async def submit_backtest(
        self, request: BacktestRequest, owner: str, idempotency_key: str | None = None, admitted: bool = False
    ) -> tuple[JobRecord, bool]:
        """A backtest is one job on the model's bulk queue: every origin's forecast, then the scores."""
        spec = self.model(request.model)
        series = series_from_inputs([request.series])
        limits.check_backtest(request, series, spec, self.settings)
        callbacks.check_url(request.callback_url, self.settings)
        stored = request.model_dump(mode="json", exclude={"model", "callback_url", "series"})
        n_origins = len(request.origins.values())
        return await self._enqueue(
            spec, Lane.ASYNC, owner, idempotency_key, stored, series, None, request.parameters.prediction_length,
            kind=JobKind.BACKTEST, callback_url=request.callback_url, n_series=n_origins, admitted=admitted,
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
    ) -> tuple[JobRecord, bool]:
        queue = keys.sync_queue(spec) if lane is Lane.SYNC else keys.queue(spec)
        if not admitted:
            await self.admit(owner)
        await self._check_queue(queue)

        job_id = uuid.uuid4().hex
        now = time.time()
        n = len(series) if n_series is None else n_series
        record = new_record(job_id, spec.id, n, prediction_length, lane, now, owner, kind, request)
        if callback_url:
            record.update(callback_url=callback_url, callback_status="pending")
        job_key = keys.job(job_id)
        identity = series_identity(series, {"kind": kind.value, **request})
        digest = _digest(f"{lane.value}\0{spec.id}\0{identity}")
        idem_key = keys.idempotency(owner, _digest(idempotency_key)) if idempotency_key else None
        ttl = self.settings.result_ttl_s + self.settings.max_job_s
        items = _items(series, nested)
        # The result cache is per API key unless CACHE_SCOPE=global: a hit would tell a key that
        # another one sent the same series.
        cached_as = identity if self.settings.cache_scope == "global" else f"{owner}:{identity}"
        record["identity"] = cached_as
        hit = await self._cached(spec, request, cached_as)
        async with self.client.pipeline(transaction=False) as pipe:
            if items is not None:
                pipe.set(keys.job_items(job_id), items, ex=ttl)
            if hit is not None:
                record.update(hit, status=JobStatus.SUCCEEDED.value, started_at=repr(now), finished_at=repr(now),
                              cached="1", inference_s=0.0)  # fmt: skip
                record = stored(record)
                await self.scripts.create_done(
                    keys=[job_key, keys.cache_output(hit["digest"]), keys.job_output(job_id),
                          *([idem_key] if idem_key else [])],
                    args=[self.settings.result_ttl_s, f"{job_id} {digest}", *(x for pair in record.items() for x in pair)],
                    client=pipe,
                )  # fmt: skip
            else:
                for chunk in _chunks(series.encode()):
                    pipe.rpush(keys.job_input(job_id), *chunk)
                pipe.expire(keys.job_input(job_id), ttl)
                fields = [item for pair in stored(record).items() for item in pair]
                await self.scripts.create(
                    keys=[job_key, keys.in_flight(owner), keys.job_input(job_id), keys.queued(spec),
                          keys.job_items(job_id), *([idem_key] if idem_key else [])],
                    args=[ttl, self._limits(owner).max_in_flight, repr(now - ttl), f"{job_id} {digest}", *fields],
                    client=pipe,
                )  # fmt: skip
            outcome = (await pipe.execute())[-1]
        if outcome is not None:
            await self.client.delete(keys.job_items(job_id))  # CREATE dropped the series already
            return await self._refused_or_replayed(outcome, digest, owner, idem_key)
        if hit is not None:
            log.info("%s %s answered from the result cache: %s", kind.value, job_id, spec.id)
            self.metrics.accepted.labels(spec.id, "cached").inc()
            return JobRecord.from_hash({k: str(v) for k, v in record.items()}), False

        if not idem_key and not callback_url and families.of(spec).cacheable(request["parameters"]):
            # Joined after creating, so that two identical requests racing cannot both miss each other.
            earlier = await self.flights.join(owner, digest, job_id, ttl)
            if earlier is not None:
                await self._discard(spec, owner, job_id)
                log.info("%s for %s attached to the same request's job %s, in flight", kind.value, spec.id, earlier)
                return await self.require(earlier, owner), False

        try:
            await asyncio.to_thread(
                self.celery.send_task, keys.FORECAST_TASK, args=[job_id], task_id=job_id, queue=queue
            )
        except Exception as exc:
            log.error("enqueue of job %s failed: %s", job_id, exc)
            await self._discard(spec, owner, job_id, *([idem_key] if idem_key else []))
            raise Problem(
                503, "broker-unavailable", "could not enqueue the job; retry", headers={"Retry-After": "1"}
            ) from exc
        log.info("%s %s accepted: %s, %d series, lane %s", kind.value, job_id, spec.id, n, lane.value)
        self.metrics.accepted.labels(spec.id, lane.value).inc()
        return JobRecord.from_hash({k: str(v) for k, v in stored(record).items()}), False

    async def _discard(self, spec: catalog.ModelSpec, owner: str, job_id: str, *also: str) -> None:
        """Undo a job's creation before its message was sent (and delete the keys `also`)."""
        await self.client.delete(keys.job(job_id), keys.job_input(job_id), keys.job_items(job_id), *also)
        await self.client.zrem(keys.in_flight(owner), job_id)
        await self.client.zrem(keys.queued(spec), job_id)

    async def _cached(self, spec: catalog.ModelSpec, request: dict, identity: str) -> dict | None:
        """The stored fields of an identical earlier request's result (and `digest`, naming its
        output list), if the model's workers agree on one weights revision and the request is
        deterministic (see shared/cache.py)."""
        if not self.settings.cache_ttl_s or not families.of(spec).cacheable(request["parameters"]):
            return None
        revision = await self._revision(spec)
        if revision is None:
            return None
        digest = cache.digest(spec, revision, identity)
        found = await self.client.get(keys.cache(digest))
        return {**json.loads(found), "digest": digest} if found else None

    async def results(self, record: JobRecord) -> tuple[list[bytes], list | None]:
        """A succeeded job's output elements (one per series or origin) and its items (ids, starts, shapes)."""
        async with self.raw.pipeline(transaction=False) as pipe:
            pipe.lrange(keys.job_output(record.id), 0, -1)
            pipe.get(keys.job_items(record.id))
            outputs, items = await pipe.execute()
        return outputs, (msgspec.msgpack.decode(items) if items else None)

    async def with_predictions(self, record: JobRecord) -> JobRecord:
        """The record with its predictions (or backtest forecasts) as Python lists: for small answers
        that other shapes are built from (the compat routes)."""
        if record.status is JobStatus.SUCCEEDED:
            outputs, items = await self.results(record)
            render.attach(record, outputs, items)
        return record

    async def _revision(self, spec: catalog.ModelSpec) -> str | None:
        """The weights revision every live worker of `spec` serves (None when none or several)."""
        revisions = {info.get("revision") for info in await self._live_workers(spec)}
        return revisions.pop() if len(revisions) == 1 else None

    async def _live_workers(self, spec: catalog.ModelSpec) -> list[dict]:
        """The heartbeats of the model's live workers, read from Redis at most once a second per model:
        every accepted job (cache, `X-Workers-Online`) and every sync call asks."""
        loop = asyncio.get_running_loop()
        known = self._heartbeats.get(spec.id)
        if known is not None and known[1] > loop.time():
            return known[0]
        live = self._live(await self.client.hgetall(keys.workers(spec)))
        self._heartbeats[spec.id] = (live, loop.time() + min(1.0, self.settings.heartbeat_s))
        return live

    def _live(self, heartbeats: dict[str, str]) -> list[dict]:
        """The heartbeats (worker name -> JSON) of workers heard from within three heartbeats."""
        now = time.time()
        return [
            info
            for info in map(json.loads, heartbeats.values())
            if now - info["last_seen"] < 3 * self.settings.heartbeat_s
        ]

    def _limits(self, owner: str) -> OwnerLimits:
        """The admission limits of `owner`: every key has its own; keyless legacy calls share theirs."""
        s = self.settings
        if owner == LEGACY:
            return OwnerLimits(s.legacy_rate_limit_per_s, s.legacy_rate_limit_burst, s.legacy_max_in_flight,
                               "keyless legacy calls", "LEGACY_MAX_IN_FLIGHT")  # fmt: skip
        return OwnerLimits(s.rate_limit_per_s, s.rate_limit_burst, s.max_in_flight, "this key", "MAX_IN_FLIGHT")

    async def admit(self, owner: str) -> None:
        """The owner's submission rate limit (429). Routes take the token before they read a body, so
        a caller over its rate costs no parsing; the queue-depth cap needs the model, so it waits for
        the body, and the in-flight cap is checked on creation."""
        own = self._limits(owner)
        if own.rate_per_s:
            wait = float(
                await self.scripts.take_token(keys=[keys.rate_bucket(owner)], args=[own.rate_per_s, own.burst])
            )
            if wait > 0:
                raise Problem(
                    429,
                    "rate-limited",
                    f"over {own.rate_per_s:g} submissions/s for {own.who} (burst {own.burst})",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )

    async def _check_queue(self, queue: str) -> None:
        settings = self.settings
        if settings.max_queue_depth and await self.client.llen(queue) >= settings.max_queue_depth:
            raise Problem(
                503,
                "queue-full",
                f"queue {queue} holds {settings.max_queue_depth} jobs or more; retry later",
                headers={"Retry-After": "5"},
            )

    async def _refused_or_replayed(
        self, outcome: str, digest: str, owner: str, idem_key: str | None
    ) -> tuple[JobRecord, bool]:
        if outcome.startswith("in-flight:"):
            own = self._limits(owner)
            raise Problem(
                429,
                "too-many-in-flight",
                f"{outcome.split(':')[1]} jobs not yet finished for {own.who} ({own.in_flight_setting} "
                f"{own.max_in_flight}); wait for some to finish",
                headers={"Retry-After": "5"},
            )
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
            await self.client.delete(idem_key)
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
        submitted, _ = await self.submit(job, lane, owner, idempotency_key, waited=True, admitted=admitted)
        record = await self.wait(submitted.id, timeout_s, owner)
        if record.status is JobStatus.FAILED:
            raise Problem(500, "forecast-failed", record.error or "the forecast failed", job_id=record.id)
        if record.terminal and record.status is not JobStatus.SUCCEEDED:
            raise Problem(
                409, f"job-{record.status.value}", f"job {record.id} was {record.status.value}", job_id=record.id
            )
        return await self.with_predictions(record) if with_results else record

    def _check_sync(self, spec: catalog.ModelSpec) -> None:
        if not self.settings.sync_eligible(spec):
            raise Problem(
                409,
                "not-sync-eligible",
                f"{spec.id} is not served synchronously; submit it with POST /v1/forecasts and poll",
                field="model",
                async_endpoint="/v1/forecasts",
            )

    async def workers_online(self, name: str) -> int:
        """How many workers of the model are live (an async job is accepted with none: one may start later)."""
        return len(await self._live_workers(self.model(name)))

    async def serving(self, spec: catalog.ModelSpec, wait_s: float = 0) -> None:
        """Return once a worker serves the model (waiting up to `wait_s`), else 503."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            if await self._live_workers(spec):
                return
            if loop.time() >= deadline:
                raise Problem(
                    503,
                    "no-worker",
                    f"no worker is serving {spec.id} right now; POST /v1/forecasts queues the job until one starts",
                    headers={"Retry-After": "5"},
                )
            await asyncio.sleep(0.5)

    async def require(self, job_id: str, owner: str) -> JobRecord:
        """The job's record; 404 when there is none or it belongs to another owner (same answer for both).
        The record is small: results live in their own list, read only for the owner (`results`)."""
        fields = await self.client.hgetall(keys.job(job_id))
        if not fields or fields.get("owner") != owner:
            raise Problem(404, "unknown-job", f"no job {job_id!r} (never accepted, or its result expired)")
        return JobRecord.from_hash(fields)

    async def wait(self, job_id: str, timeout_s: float, owner: str) -> JobRecord:
        """The job's record as soon as it is terminal, or as it stands when `timeout_s` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self.events.watch(job_id) as announced:
            while True:
                announced.clear()
                record = await self.require(job_id, owner)
                remaining = deadline - loop.time()
                if record.terminal or remaining <= 0:
                    return record
                try:
                    await asyncio.wait_for(announced.wait(), min(remaining, _RECHECK_S))
                except TimeoutError:
                    pass

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
                try:
                    await asyncio.wait_for(announced.wait(), _RECHECK_S)
                except TimeoutError:
                    pass

    async def cancel(self, job_id: str, owner: str) -> tuple[JobRecord, bool]:
        """Cancel a job that has not finished; returns its record and whether it stopped already."""
        outcome = await self.scripts.cancel(
            keys=[keys.job(job_id), keys.in_flight(owner), keys.job_input(job_id), keys.job_output(job_id)],
            args=[repr(time.time()), self.settings.result_ttl_s, keys.EVENTS_CHANNEL, job_id, owner],
        )
        if outcome not in ("cancelled", "cancelling", "missing"):
            raise Problem(409, "job-finished", f"job {job_id} already {outcome}; nothing to cancel", status_now=outcome)
        return await self.require(job_id, owner), outcome == "cancelled"  # require answers 404 for 'missing'

    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), 1.0))
        except Exception:
            return False


class OwnerLimits(NamedTuple):
    rate_per_s: float
    burst: int
    max_in_flight: int
    who: str  # how problem details name the owner
    in_flight_setting: str


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _items(series: SeriesSet, nested: list[bool] | None) -> bytes | None:
    """What rendering a job's answer needs besides the numbers: item ids, starts, which series came
    as a list of variates. None when every series is plain (nothing to store)."""
    if not any(series.item_ids) and not any(series.starts) and not nested:
        return None
    return msgspec.msgpack.encode(
        [[item, start, bool(nested and nested[i])] for i, (item, start) in enumerate(zip(series.item_ids, series.starts))]
    )


def _chunks(elements: list[bytes], budget: int = 8 << 20) -> list[list[bytes]]:
    """Elements in groups of about `budget` bytes: one RPUSH each, so no command grows with the job."""
    out: list[list[bytes]] = [[]]
    size = 0
    for element in elements:
        if size + len(element) > budget and out[-1]:
            out.append([])
            size = 0
        out[-1].append(element)
        size += len(element)
    return out
