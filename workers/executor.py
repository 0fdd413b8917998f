"""One forecast job, start to finish: claim it, run its series through the batcher, store the outcome."""

from __future__ import annotations

import logging
import time

import redis

from shared import keys
from shared.jobs import JobStatus, Lane, Scripts, finish_args
from shared.schemas import ForecastParameters
from shared.settings import Settings
from workers import metrics
from workers.batcher import Batcher, Work, group_key

log = logging.getLogger(__name__)

# How long a job's Redis writes keep retrying while Redis is away (a restart takes seconds).
_REDIS_PATIENCE_S = 300.0


def _outlasting_redis(call, *args, **kwargs):
    """`call`, retried while Redis is unreachable, so a Redis restart never strands a finished job.

    Past the patience the error propagates: the task fails without an ack
    (`task_acks_on_failure_or_timeout=False`) and Redis delivers the message again later.
    """
    deadline = time.monotonic() + _REDIS_PATIENCE_S
    while True:
        try:
            return call(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unreachable (%s); retrying", exc)
            time.sleep(0.5)


def execute(job_id: str, payload: dict, batcher: Batcher, client: redis.Redis, settings: Settings, worker: str) -> str:
    """Run one job message (on a task thread); returns the job's status afterwards.

    A message whose job is no longer runnable (cancelled while queued, already finished by
    an earlier delivery, or expired) is dropped without touching the model.
    """
    spec = batcher.runtime.spec
    scripts = Scripts(client)
    job_key = keys.job(job_id)
    created_at, lane, owner = _outlasting_redis(client.hmget, job_key, "created_at", "lane", "owner")
    in_flight = keys.in_flight(owner or "")
    state = _outlasting_redis(
        scripts.start,
        keys=[job_key, in_flight, keys.queued(spec), keys.payload(job_id)],
        args=[repr(time.time()), worker, settings.max_deliveries, settings.result_ttl_s, keys.EVENTS_CHANNEL, job_id],
    )
    if state != JobStatus.RUNNING:
        log.info("job %s: not runnable (%s), message dropped", job_id, state)
        metrics.JOBS.labels(spec.id, "dropped" if state != JobStatus.FAILED else "failed").inc()
        return state
    lane = Lane(lane or Lane.ASYNC)
    if created_at:
        metrics.QUEUE_WAIT.labels(spec.id, lane.value).observe(max(0.0, time.time() - float(created_at)))

    inputs = payload["inputs"]
    fields: dict = {"weights": batcher.runtime.weights.kind, "inference_s": 0.0}
    try:
        params = ForecastParameters.model_validate(payload["parameters"])
        work = Work(job_id, [s["target"] for s in inputs], params, lane, group_key(spec, params))
    except Exception as exc:  # a message this worker cannot read fails its job, not the worker
        work, error = None, f"{type(exc).__name__}: {exc}"
    else:
        batcher.submit(work)
        finished = work.finished.wait(settings.max_job_s)
        if not finished:
            batcher.abandon(work)
        error = work.error if finished else f"TimeoutError: not finished within MAX_JOB_S={settings.max_job_s}s"
        fields["inference_s"] = round(work.model_s, 6)
    if error:
        log.error("job %s failed: %s", job_id, error)
        fields["error"] = error
        outcome = JobStatus.FAILED
    elif work.cancelled:
        outcome = JobStatus.CANCELLED
    else:
        for series, forecast in zip(inputs, work.results, strict=True):
            forecast["item_id"] = series.get("item_id")
            if series.get("start") is not None:
                forecast["start"] = series["start"]
        fields["predictions"] = work.results
        outcome = JobStatus.SUCCEEDED
    final = _outlasting_redis(
        scripts.finish,
        keys=[job_key, in_flight, keys.payload(job_id)],
        args=finish_args(outcome, time.time(), settings.result_ttl_s, keys.EVENTS_CHANNEL, job_id, fields),
    )
    log.info("job %s: %s (%d series, %.3fs in the model)", job_id, final, len(inputs), fields["inference_s"])
    metrics.JOBS.labels(spec.id, final).inc()
    metrics.INFERENCE.labels(spec.id).observe(fields["inference_s"])
    if final == JobStatus.SUCCEEDED:
        metrics.SERIES.labels(spec.id).inc(len(inputs))
    return final
