"""The worker's job function and model runtime, in-process, on a real Redis and a real checkpoint."""

from __future__ import annotations

import time
import uuid

import pytest

from shared import catalog, keys
from shared.jobs import JobRecord, JobStatus, Lane, new_record
from shared.schemas import ForecastRequest
from workers.executor import execute
from workers.runtime import ModelRuntime
from workers.weights import resolve

from conftest import BOLT, forecast_body, settings_for


@pytest.fixture(scope="module")
def runtime(redis_server, synthetic_dir) -> ModelRuntime:
    settings = settings_for(redis_server, weights="synthetic", synthetic_dir=str(synthetic_dir))
    spec = catalog.get(BOLT)
    return ModelRuntime(spec, resolve(spec, settings), settings)


def run_job(redis_server, runtime, body) -> JobRecord:
    client = redis_server.client()
    job_id = uuid.uuid4().hex
    client.hset(
        keys.job(job_id), mapping=new_record(job_id, BOLT, len(body["inputs"]), 4, Lane.ASYNC, time.time(), "owner")
    )
    payload = ForecastRequest.model_validate(body).model_dump(mode="json", exclude={"model"})  # as the API sends it
    execute(job_id, payload, runtime, client, settings_for(redis_server), "test-worker")
    return JobRecord.from_hash(client.hgetall(keys.job(job_id)))


def test_a_job_whose_model_call_raises_ends_failed_with_the_message(redis_server, runtime, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(runtime.pipeline, "predict_quantiles", broken)

    rec = run_job(redis_server, runtime, forecast_body(BOLT))

    assert rec.status is JobStatus.FAILED
    assert rec.error == "RuntimeError: CUDA error: device-side assert triggered"
    assert rec.predictions is None and rec.finished_at is not None


def test_a_job_larger_than_the_model_batch_is_split_and_keeps_series_order(redis_server, runtime):
    n = runtime.max_batch * 2 + 3
    body = forecast_body(BOLT, n_series=n, length=40, horizon=4)

    rec = run_job(redis_server, runtime, body)

    assert rec.status is JobStatus.SUCCEEDED
    assert [p["item_id"] for p in rec.predictions] == [f"s{i}" for i in range(n)]
    single = run_job(redis_server, runtime, {**body, "inputs": [body["inputs"][n - 1]]})
    # Same forecast as the series alone, up to float noise: a batch left-pads to its longest series.
    assert rec.predictions[-1]["0.5"] == pytest.approx(single.predictions[0]["0.5"], rel=1e-5)


def test_series_longer_than_the_context_are_cut_to_the_context_window(runtime):
    context = runtime.spec.context_length
    tail = [float(i % 17) for i in range(context)]
    long_series = [1e6] * 500 + tail

    (long,), (exact,) = (runtime.forecast([s], 4, [0.5]) for s in (long_series, tail))

    assert long["0.5"] == exact["0.5"]
