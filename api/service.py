"""What the routes do, as plain async functions over Redis and Celery (callable without HTTP)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import uuid

import redis.asyncio as aioredis
from celery import Celery

from shared import catalog, keys
from shared.jobs import JobRecord, JobStatus, Lane, Scripts, new_record
from shared.schemas import ForecastRequest, ModelView, WorkerView
from shared.settings import Settings

from api import limits
from api.events import JobEvents
from api.metrics import ApiMetrics
from api.problems import Problem

log = logging.getLogger(__name__)

# A waiter re-reads the record at least this often, so a lost pub/sub message only delays it.
_RECHECK_S = 1.0


class JobService:
    def __init__(
        self, settings: Settings, client: aioredis.Redis, celery: Celery, events: JobEvents, metrics: ApiMetrics
    ):
        self.settings, self.client, self.celery, self.events, self.metrics = settings, client, celery, events, metrics
        self.scripts = Scripts(client)

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
        now = time.time()
        views = []
        for i, spec in enumerate(specs):
            depth, sync_depth, heartbeats = replies[3 * i : 3 * i + 3]
            workers = [
                WorkerView(**{k: info[k] for k in WorkerView.model_fields})
                for info in map(json.loads, heartbeats.values())
                if now - info["last_seen"] < 3 * self.settings.heartbeat_s
            ]
            kinds = {w.weights for w in workers}
            views.append(
                ModelView(
                    id=spec.id,
                    slug=spec.slug,
                    family=spec.family.value,
                    served=spec.served,
                    queue=keys.queue(spec),
                    sync_queue=keys.sync_queue(spec),
                    context_length=spec.context_length,
                    prediction_length=spec.prediction_length,
                    sample_based=spec.sample_based,
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
        self, request: ForecastRequest, lane: Lane, owner: str, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Validate, admit, record the job and enqueue it on its model's queue.

        Returns the job and whether it is an earlier job replayed for the same `idempotency_key`.
        """
        spec = self.model(request.model)
        if not spec.served:
            raise Problem(501, "model-not-served", f"{spec.id} is in the catalog but not served yet", field="model")
        limits.check(request, spec, self.settings)
        if lane is Lane.SYNC:
            await self._check_sync(spec)
        queue = keys.sync_queue(spec) if lane is Lane.SYNC else keys.queue(spec)
        await self._admit(owner, queue)

        job_id = uuid.uuid4().hex
        now = time.time()
        record = new_record(
            job_id, spec.id, len(request.inputs), request.parameters.prediction_length, lane, now, owner
        )
        job_key = keys.job(job_id)
        ttl = self.settings.result_ttl_s + self.settings.max_job_s
        digest = _digest(json.dumps([lane.value, request.model_dump(mode="json")], sort_keys=True))
        idem_key = keys.idempotency(owner, _digest(idempotency_key)) if idempotency_key else None
        fields = [item for pair in record.items() for item in pair]
        payload = request.model_dump(mode="json", exclude={"model"})
        outcome = await self.scripts.create(
            keys=[job_key, keys.in_flight(owner), keys.payload(job_id), keys.queued(spec),
                  *([idem_key] if idem_key else [])],
            args=[ttl, self.settings.max_in_flight, repr(now - ttl), f"{job_id} {digest}", json.dumps(payload), *fields],
        )  # fmt: skip
        if outcome is not None:
            return await self._refused_or_replayed(outcome, digest, owner, idem_key)

        try:
            await asyncio.to_thread(
                self.celery.send_task, keys.FORECAST_TASK, args=[job_id, payload], task_id=job_id, queue=queue
            )
        except Exception as exc:
            log.error("enqueue of job %s failed: %s", job_id, exc)
            await self.client.delete(job_key, keys.payload(job_id), *([idem_key] if idem_key else []))
            await self.client.zrem(keys.in_flight(owner), job_id)
            await self.client.zrem(keys.queued(spec), job_id)
            raise Problem(
                503, "broker-unavailable", "could not enqueue the job; retry", headers={"Retry-After": "1"}
            ) from exc
        log.info("job %s accepted: %s, %d series, lane %s", job_id, spec.id, len(request.inputs), lane.value)
        self.metrics.accepted.labels(spec.id, lane.value).inc()
        return JobRecord.from_hash({k: str(v) for k, v in record.items()}), False

    async def _admit(self, owner: str, queue: str) -> None:
        """The submission rate limit and the queue-depth cap (the in-flight cap is checked on creation)."""
        settings = self.settings
        if settings.rate_limit_per_s:
            wait = float(
                await self.scripts.take_token(
                    keys=[keys.rate_bucket(owner)], args=[settings.rate_limit_per_s, settings.rate_limit_burst]
                )
            )
            if wait > 0:
                raise Problem(
                    429,
                    "rate-limited",
                    f"over {settings.rate_limit_per_s:g} submissions/s for this key (burst {settings.rate_limit_burst})",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
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
            raise Problem(
                429,
                "too-many-in-flight",
                f"this key has {outcome.split(':')[1]} jobs not yet finished (MAX_IN_FLIGHT "
                f"{self.settings.max_in_flight}); wait for some to finish",
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
        self, request: ForecastRequest, lane: Lane, owner: str, timeout_s: float, idempotency_key: str | None = None
    ) -> JobRecord:
        """Submit and wait: the succeeded record, or the job as it stands when `timeout_s` runs out.

        A job that failed or was cancelled meanwhile is a problem response carrying its id.
        """
        submitted, _ = await self.submit(request, lane, owner, idempotency_key)
        record = await self.wait(submitted.id, timeout_s, owner)
        if record.status is JobStatus.FAILED:
            raise Problem(500, "forecast-failed", record.error or "the forecast failed", job_id=record.id)
        if record.terminal and record.status is not JobStatus.SUCCEEDED:
            raise Problem(
                409, f"job-{record.status.value}", f"job {record.id} was {record.status.value}", job_id=record.id
            )
        return record

    async def _check_sync(self, spec: catalog.ModelSpec) -> None:
        if not self.settings.sync_eligible(spec):
            raise Problem(
                409,
                "not-sync-eligible",
                f"{spec.id} is not served synchronously; submit it with POST /v1/forecasts and poll",
                field="model",
                async_endpoint="/v1/forecasts",
            )
        await self.serving(spec)

    async def serving(self, spec: catalog.ModelSpec, wait_s: float = 0) -> ModelView:
        """The model's live view once a worker serves it (waiting up to `wait_s`), else 503 (501 if never)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            (view,) = await self.models((spec,))
            if not spec.served:
                raise Problem(501, "model-not-served", f"{spec.id} is in the catalog but not served yet", field="model")
            if view.workers_online:
                return view
            if loop.time() >= deadline:
                raise Problem(
                    503,
                    "no-worker",
                    f"no worker is serving {spec.id} right now; POST /v1/forecasts queues the job until one starts",
                    headers={"Retry-After": "5"},
                )
            await asyncio.sleep(0.5)

    async def require(self, job_id: str, owner: str) -> JobRecord:
        """The job's record; 404 when there is none or it belongs to another owner (same answer for both)."""
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

    async def cancel(self, job_id: str, owner: str) -> tuple[JobRecord, bool]:
        """Cancel a job that has not finished; returns its record and whether it stopped already."""
        outcome = await self.scripts.cancel(
            keys=[keys.job(job_id), keys.in_flight(owner), keys.payload(job_id)],
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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
