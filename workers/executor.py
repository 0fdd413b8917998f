"""One forecast job, start to finish: claim it, run the model, store the outcome."""

from __future__ import annotations

import logging
import time

import redis

from shared import keys
from shared.jobs import JobStatus, Scripts, finish_args
from shared.schemas import ForecastParameters
from shared.settings import Settings
from workers import metrics
from workers.runtime import Cancelled, ModelRuntime

log = logging.getLogger(__name__)


def execute(
    job_id: str, payload: dict, runtime: ModelRuntime, client: redis.Redis, settings: Settings, worker: str
) -> str:
    """Run one job message; returns the job's status afterwards.

    A message whose job is no longer runnable (cancelled while queued, already finished by
    an earlier delivery, or expired) is dropped without touching the model.
    """
    scripts = Scripts(client)
    job_key = keys.job(job_id)
    state = scripts.start(keys=[job_key], args=[repr(time.time()), worker])
    if state != JobStatus.RUNNING:
        log.info("job %s: not runnable (%s), message dropped", job_id, state)
        metrics.JOBS.labels(runtime.spec.id, "dropped").inc()
        return state
    created_at, lane = client.hmget(job_key, "created_at", "lane")
    if created_at:
        metrics.QUEUE_WAIT.labels(runtime.spec.id, lane or "async").observe(max(0.0, time.time() - float(created_at)))

    inputs = payload["inputs"]
    fields: dict = {"weights": runtime.weights.kind}
    started = time.perf_counter()
    try:
        params = ForecastParameters.model_validate(payload["parameters"])
        predictions = runtime.forecast(
            [series["target"] for series in inputs],
            prediction_length=params.prediction_length,
            quantile_levels=params.quantile_levels,
            sampling=params.sampling(),
            return_samples=params.return_samples,
            should_stop=lambda: client.hget(job_key, "cancel_requested") == "1",
        )
        for series, forecast in zip(inputs, predictions):
            forecast["item_id"] = series.get("item_id")
            if series.get("start") is not None:
                forecast["start"] = series["start"]
        fields["predictions"] = predictions
        outcome = JobStatus.SUCCEEDED
    except Cancelled:
        outcome = JobStatus.CANCELLED
    except Exception as exc:  # the model's failure is the job's outcome, not the worker's
        log.exception("job %s failed", job_id)
        fields["error"] = f"{type(exc).__name__}: {exc}"
        outcome = JobStatus.FAILED
    fields["inference_s"] = round(time.perf_counter() - started, 6)
    final = scripts.finish(
        keys=[job_key],
        args=finish_args(outcome, time.time(), settings.result_ttl_s, keys.EVENTS_CHANNEL, job_id, fields),
    )
    log.info("job %s: %s (%d series, %.3fs)", job_id, final, len(inputs), fields["inference_s"])
    metrics.JOBS.labels(runtime.spec.id, final).inc()
    metrics.INFERENCE.labels(runtime.spec.id).observe(fields["inference_s"])
    if final == JobStatus.SUCCEEDED:
        metrics.SERIES.labels(runtime.spec.id).inc(len(inputs))
    return final
