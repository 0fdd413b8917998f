"""One forecast job, start to finish: claim it, run its series through the batcher, store the outcome."""

from __future__ import annotations

import json
import logging
import time

import redis

from shared import cache, keys
from shared.jobs import JobKind, JobStatus, Lane, Scripts, finish_args
from shared.schemas import BacktestRequest, ForecastParameters
from shared.settings import Settings
from workers import backtest, metrics
from workers.batcher import Batcher, Work, group_key

log = logging.getLogger(__name__)

# How often a long job's progress (series done) is written to its record.
_PROGRESS_EVERY_S = 0.5

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


def _read(payload: dict, spec) -> tuple[BacktestRequest | None, list[dict], ForecastParameters]:
    """A job message's model inputs and parameters (and its backtest request, for a backtest)."""
    if payload.get("kind") == JobKind.BACKTEST:
        request = BacktestRequest.model_validate({"model": spec.id, **payload["backtest"]})
        params = request.parameters.model_copy(update={"quantile_levels": backtest.levels(request)})
        return request, backtest.windows(request, spec.context_length), params
    return None, payload["inputs"], ForecastParameters.model_validate(payload["parameters"])


def _remember(client: redis.Redis, spec, revision: str, payload: dict, fields: dict, ttl_s: int) -> None:
    """Keep a deterministic job's result for identical requests (best effort: a miss only costs a run)."""
    kept = {name: fields[name] for name in ("weights", "predictions", "backtest", "progress_done") if name in fields}
    try:
        client.set(keys.cache(cache.digest(spec, revision, payload)), json.dumps(kept), ex=ttl_s)
    except redis.RedisError as exc:
        log.warning("result not cached: %s", exc)


def _await(work: Work, limit_s: float, report) -> bool:
    """Wait for the batcher to finish `work` (at most `limit_s`), reporting its progress now and then."""
    deadline = time.monotonic() + limit_s
    reported = 0
    while not work.finished.wait(min(_PROGRESS_EVERY_S, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
        if work.done != reported:
            reported = work.done
            try:
                report(reported)
            except redis.RedisError as exc:  # progress is best effort; the outcome is not
                log.warning("progress of job %s not recorded: %s", work.job_id, exc)
    return True


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

    fields: dict = {"weights": batcher.runtime.weights.kind, "inference_s": 0.0}
    try:
        request, inputs, params = _read(payload, spec)
        work = Work(job_id, inputs, params, lane, group_key(spec, params, job_id))
    except Exception as exc:  # a message this worker cannot read fails its job, not the worker
        work, error = None, f"{type(exc).__name__}: {exc}"
    else:
        batcher.submit(work)
        finished = _await(
            work,
            settings.max_job_s,
            lambda done: scripts.progress(keys=[job_key], args=[done, keys.EVENTS_CHANNEL, job_id]),
        )
        if not finished:
            batcher.abandon(work)
        error = work.error if finished else f"TimeoutError: not finished within MAX_JOB_S={settings.max_job_s}s"
        fields["inference_s"] = round(work.model_s, 6)
        fields["progress_done"] = work.done
    if error:
        log.error("job %s failed: %s", job_id, error)
        fields["error"] = error
        outcome = JobStatus.FAILED
    elif work.cancelled:
        outcome = JobStatus.CANCELLED
    elif request is not None:
        try:
            fields["backtest"] = backtest.score(request, work.results)
            outcome = JobStatus.SUCCEEDED
        except Exception as exc:  # scoring is ours, not the model's: still fail the job, not the worker
            log.exception("job %s: scoring the backtest failed", job_id)
            fields["error"], outcome = f"{type(exc).__name__}: {exc}", JobStatus.FAILED
    else:
        for series, forecast in zip(inputs, work.results, strict=True):
            forecast["item_id"] = series.get("item_id")
            if series.get("start") is not None:
                forecast["start"] = series["start"]
        fields["predictions"] = work.results
        outcome = JobStatus.SUCCEEDED
    if outcome == JobStatus.SUCCEEDED and settings.cache_ttl_s and cache.cacheable(spec, payload):
        # Before FINISH, so a client that sends the same request the moment it sees the result hits the cache.
        _remember(client, spec, batcher.runtime.weights.revision, payload, fields, settings.cache_ttl_s)
    final = _outlasting_redis(
        scripts.finish,
        keys=[job_key, in_flight, keys.payload(job_id)],
        args=finish_args(outcome, time.time(), settings.result_ttl_s, keys.EVENTS_CHANNEL, job_id, fields),
    )
    n = len(work.inputs) if work else 0
    log.info("job %s: %s (%d series, %.3fs in the model)", job_id, final, n, fields["inference_s"])
    metrics.JOBS.labels(spec.id, final).inc()
    metrics.INFERENCE.labels(spec.id).observe(fields["inference_s"])
    if final == JobStatus.SUCCEEDED:
        metrics.SERIES.labels(spec.id).inc(n)
    return final
