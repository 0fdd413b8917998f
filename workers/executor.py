"""One forecast job, start to finish: claim it, run its series through the batcher, store the outcome."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import redis

from shared import cache, families, keys
from shared.jobs import PROGRESS, JobKind, JobStatus, Lane, Scripts, finish_args
from shared.schemas import BacktestRequest, ForecastParameters
from shared.series import Decoded, decode
from shared.settings import Settings
from workers import backtest, metrics
from workers.batcher import Batcher, Slice, Work

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


class RedisPassIO:
    """A pass's series and results through Redis, each step one pipelined round trip: read the
    series of every job in the pass (LRANGE of each job's input list) and their cancel flags;
    mark them `in_pass` right before the model runs; append the results (RPUSH to each job's
    output list), clear the mark and record progress. The mark is how a redelivery knows whether
    the job was in the pass that killed its worker (shared/jobs.py, START). The batcher reads
    and writes on its I/O thread while the model computes; only the mark waits for Redis."""

    def __init__(self, raw: redis.Redis, ttl_s: int = 86_400):
        self.raw = raw  # binary replies
        self.ttl_s = ttl_s
        self._progress = raw.register_script(PROGRESS)

    def read(self, batch: list[Slice]) -> tuple[list[Decoded], set[str]]:
        with self.raw.pipeline(transaction=False) as pipe:
            for work, start, end in batch:
                pipe.hget(keys.job(work.job_id), "cancel_requested")
                if work.inputs is None:
                    pipe.lrange(keys.job_input(work.job_id), start, end - 1)
            replies = iter(_outlasting_redis(pipe.execute))
        decoded: list[Decoded] = []
        stopped = set()
        for work, start, end in batch:
            if next(replies) == b"1":
                stopped.add(work.job_id)
            elements = work.inputs[start:end] if work.inputs is not None else [decode(e) for e in next(replies)]
            if len(elements) != end - start:  # the input list expired or was deleted under the job
                raise RuntimeError(f"job {work.job_id}: series {start}..{end} are no longer stored")
            decoded.extend(elements)
        return decoded, stopped

    def begin(self, batch: list[Slice]) -> None:
        with self.raw.pipeline(transaction=False) as pipe:
            for work, _, _ in batch:
                pipe.hset(keys.job(work.job_id), "in_pass", "1")  # a death from here on counts against it
            _outlasting_redis(pipe.execute)

    def write(self, results: list[tuple[Slice, list[np.ndarray]]]) -> None:
        if not results:
            return
        with self.raw.pipeline(transaction=False) as pipe:
            for (work, _, end), arrays in results:
                pipe.rpush(keys.job_output(work.job_id), *(a.tobytes() for a in arrays))
                # Written after the pass, so the job may have ended meanwhile (failed in a later pass,
                # cancelled): the list then must not outlive it. FINISH sets its final lifetime.
                pipe.expire(keys.job_output(work.job_id), self.ttl_s)
                pipe.hdel(keys.job(work.job_id), "in_pass")
                if end < work.n:  # the last pass's progress comes with the job's final state
                    self._progress(keys=[keys.job(work.job_id)], args=[end, keys.EVENTS_CHANNEL, work.job_id], client=pipe)
            _outlasting_redis(pipe.execute)


def _remember(client: redis.Redis, job_id: str, digest: str, fields: dict, ttl_s: int) -> None:
    """Keep a deterministic job's result for identical requests (best effort: a miss only costs a run)."""
    kept = {name: fields[name] for name in ("weights", "backtest", "progress_done") if name in fields}
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.copy(keys.job_output(job_id), keys.cache_output(digest), replace=True)
            pipe.expire(keys.cache_output(digest), ttl_s)
            pipe.set(keys.cache(digest), json.dumps(kept), ex=ttl_s)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("result not cached: %s", exc)


def _backtest_work(raw: redis.Redis, job_id: str, spec, request: dict, lane: Lane) -> tuple[Work, BacktestRequest]:
    """A backtest's windows, cut from its one stored series, as in-memory work whose results are kept."""
    stored = decode(_outlasting_redis(raw.lindex, keys.job_input(job_id), 0))
    series: dict = {"target": _as_list(stored.target[0])}
    if stored.past:
        series["past_covariates"] = {name: _as_list(values) for name, values in stored.past.items()}
    backtest_request = BacktestRequest.model_validate({"model": spec.id, "series": series, **request})
    params = backtest_request.parameters.model_copy(update={"quantile_levels": backtest.levels(backtest_request)})
    windows = [
        Decoded.of(w["target"], w.get("past_covariates"), w.get("future_covariates"))
        for w in backtest.windows(backtest_request, spec.context_length)
    ]
    work = Work(job_id, len(windows), params, lane, families.of(spec).group_key(params, job_id), inputs=windows, keep=True)
    return work, backtest_request


def _as_list(values: np.ndarray) -> list:
    if values.dtype == object:
        return values.tolist()
    return [None if np.isnan(x) else float(x) for x in values.tolist()]


def execute(
    job_id: str, batcher: Batcher, client: redis.Redis, raw: redis.Redis, settings: Settings, worker: str
) -> str:
    """Run one job message (on a task thread); returns the job's status afterwards.

    A message whose job is no longer runnable (cancelled while queued, already finished by
    an earlier delivery, or expired) is dropped without touching the model.
    """
    spec = batcher.runtime.spec
    scripts = Scripts(client)
    job_key = keys.job(job_id)
    created_at, lane, owner, n_series, kind, request, lost, identity = _outlasting_redis(
        client.hmget, job_key, "created_at", "lane", "owner", "n_series", "kind", "request", "lost", "identity"
    )
    in_flight = keys.in_flight(owner or "")
    state = _outlasting_redis(
        scripts.start,
        keys=[job_key, in_flight, keys.queued(spec), keys.job_input(job_id), keys.job_output(job_id)],
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
    stored_request = json.loads(request or "{}")
    backtest_request = None
    try:
        if kind == JobKind.BACKTEST:
            work, backtest_request = _backtest_work(raw, job_id, spec, stored_request, lane)
        else:
            params = ForecastParameters.model_validate(stored_request["parameters"])
            key = families.of(spec).group_key(params, job_id)
            # A job that was in the pass of a worker that died may be what killed it: it runs alone
            # from now on, so no other job shares its next passes (and its fate).
            work = Work(job_id, int(n_series or 0), params, lane, (*key, job_id) if lost else key)
    except Exception as exc:  # a job this worker cannot read fails, not the worker
        work, error = None, f"{type(exc).__name__}: {exc}"
    else:
        batcher.submit(work)
        finished = work.finished.wait(settings.max_job_s)
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
    elif backtest_request is not None:
        try:
            levels = work.params.quantile_levels
            forecasts = [{str(q): block[0, 1 + j] for j, q in enumerate(levels)} for block in work.kept]
            fields["backtest"] = {"metrics": backtest.score(backtest_request, forecasts)["metrics"]}
            outcome = JobStatus.SUCCEEDED
        except Exception as exc:  # scoring is ours, not the model's: still fail the job, not the worker
            log.exception("job %s: scoring the backtest failed", job_id)
            fields["error"], outcome = f"{type(exc).__name__}: {exc}", JobStatus.FAILED
    else:
        outcome = JobStatus.SUCCEEDED
    parameters = stored_request.get("parameters", {})
    if outcome == JobStatus.SUCCEEDED and settings.cache_ttl_s and families.of(spec).cacheable(parameters):
        # Before FINISH, so a client that sends the same request the moment it sees the result hits the cache.
        if identity:
            digest = cache.digest(spec, batcher.runtime.weights.revision, identity)
            _remember(client, job_id, digest, fields, settings.cache_ttl_s)
    final = _outlasting_redis(
        scripts.finish,
        keys=[job_key, in_flight, keys.job_input(job_id), keys.job_output(job_id), keys.job_items(job_id)],
        args=finish_args(outcome, time.time(), settings.result_ttl_s, keys.EVENTS_CHANNEL, job_id, fields),
    )
    n = work.n if work else 0
    log.info("job %s: %s (%d series, %.3fs in the model)", job_id, final, n, fields["inference_s"])
    metrics.JOBS.labels(spec.id, final).inc()
    metrics.INFERENCE.labels(spec.id).observe(fields["inference_s"])
    if final == JobStatus.SUCCEEDED:
        metrics.SERIES.labels(spec.id).inc(n)
    return final
