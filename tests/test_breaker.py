"""The circuit breaker per model (api/breaker.py, lua/finish.lua, lua/probe.lua): jobs that fail on a
real worker open the model's circuit, sync calls are then refused (or fall back), and a probe that
succeeds closes it. The cool-off is passed by moving the circuit's opening time back, not by waiting."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from shared import catalog
from shared.store import JobRecord, JobStatus, JobStore, Lane, keys

from conftest import API_KEY, BOLT, forecast_body, settings_for, start_worker

pytestmark = pytest.mark.integration

MODEL = "amazon/chronos-bolt-mini"  # no session worker: this module starts its own
SPEC = catalog.get(MODEL)
BREAKER = {"breaker_min_jobs": 3, "breaker_failure_ratio": 0.5, "breaker_window_s": 60, "breaker_cooloff_s": 30}


@pytest.fixture(scope="module")
def mini_worker(redis_server, synthetic_dir, tmp_path_factory, workers):
    from workers import synthetic

    if not (synthetic_dir / SPEC.slug).exists():
        synthetic.build(SPEC, synthetic_dir / SPEC.slug, seed=0)
    worker = start_worker(
        redis_server, synthetic_dir, MODEL, tmp_path_factory.mktemp("logs"),
        **{name.upper(): str(value) for name, value in BREAKER.items()},
    )  # fmt: skip
    yield worker
    worker.stop()


def app(redis_server, **overrides) -> TestClient:
    """A fresh app each time: its fleet has not cached the circuit as it was a moment ago."""
    return TestClient(
        create_app(settings_for(redis_server, heartbeat_s=1, **BREAKER, **overrides)), headers={"X-API-Key": API_KEY}
    )


@pytest.fixture()
def clean_circuit(redis_server) -> Iterator[None]:
    client = redis_server.client()
    client.delete(keys.circuit(SPEC), *client.keys(keys.outcomes(SPEC, 0).rsplit(":", 1)[0] + ":*"))
    yield
    client.delete(keys.circuit(SPEC))


def fail_on_the_worker(redis_server, n: int) -> list[str]:
    """Run `n` jobs that fail on the real worker: records whose series are gone (what a store that lost
    them would look like), sent to the model's queue as the API sends jobs; returns their end states."""
    from shared.celery_app import make_celery, send_jobs

    client = redis_server.client()
    ids = []
    for _ in range(n):
        job_id = uuid.uuid4().hex
        record = JobRecord(job_id, SPEC.id, JobStatus.QUEUED, Lane.ASYNC, 1, 4, time.time(), "owner",
                           request={"parameters": {"prediction_length": 4}})  # fmt: skip
        client.hset(keys.job(job_id), mapping=record.to_hash())
        ids.append(job_id)
    celery = make_celery(settings_for(redis_server))
    for job_id in ids:
        send_jobs(celery, SPEC, Lane.ASYNC, [job_id])
    deadline = time.monotonic() + 60
    while (states := [client.hget(keys.job(job_id), "status") for job_id in ids]) != ["failed"] * n:
        if time.monotonic() > deadline or any(s not in ("queued", "running", "failed") for s in states):
            return states
        time.sleep(0.1)
    return states


def test_failures_open_the_circuit_and_sync_calls_are_refused_fast_with_retry_after(
    redis_server, mini_worker, clean_circuit
):
    failed = fail_on_the_worker(redis_server, 3)
    with app(redis_server) as api:
        refused = api.post("/v1/predict", json=forecast_body(MODEL, horizon=3))
        listed = api.get(f"/v1/models/{MODEL}").json()
        metrics = api.get("/metrics").text

    assert failed == ["failed"] * 3
    assert refused.status_code == 503 and refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "model-unavailable" and 0 < int(refused.headers["retry-after"]) <= 30
    assert listed["circuit"] == "open" and listed["workers_online"] == 1
    assert f'chronos_queue_circuit_state{{model="{MODEL}",state="open"}} 1.0' in metrics


def test_an_open_circuit_sends_sync_calls_down_the_fallback_chain(redis_server, mini_worker, clean_circuit):
    fail_on_the_worker(redis_server, 3)
    with app(redis_server, fallbacks=f"{MODEL}>{BOLT}") as api:
        response = api.post("/v1/predict", json=forecast_body(MODEL, horizon=3))

    assert response.status_code == 200 and response.json()["served_by"] == BOLT


def test_after_the_cool_off_a_probe_that_succeeds_closes_the_circuit(redis_server, mini_worker, clean_circuit):
    client = redis_server.client()
    fail_on_the_worker(redis_server, 3)
    client.hset(keys.circuit(SPEC), "opened_at", repr(time.time() - 31))  # the cool-off has passed
    with app(redis_server) as api:
        listed_before = api.get(f"/v1/models/{MODEL}").json()["circuit"]
        probe = api.post("/v1/predict", json=forecast_body(MODEL, horizon=3))
        listed_after = api.get(f"/v1/models/{MODEL}").json()["circuit"]

    assert listed_before == "half_open"
    assert probe.status_code == 200 and probe.json()["served_by"] == MODEL
    assert listed_after == "closed" and not client.exists(keys.circuit(SPEC))


# -- the breaker's counting, on the finish script alone ---------------------------------------------


@pytest.fixture()
def store(redis_server, clean_circuit) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_server.url), settings_for(redis_server, **BREAKER))


def ended(store: JobStore, status: JobStatus) -> None:
    job_id = uuid.uuid4().hex
    record = JobRecord(job_id, SPEC.id, JobStatus.QUEUED, Lane.ASYNC, 1, 4, time.time(), "owner")
    store.client.hset(keys.job(job_id), mapping=record.to_hash())
    (claim,) = store.start(SPEC, [job_id], "w1")
    store.finish([(claim.record, status, {})])


def test_failures_below_the_ratio_or_the_minimum_leave_the_circuit_closed(store):
    ended(store, JobStatus.FAILED)
    ended(store, JobStatus.FAILED)  # 2 < breaker_min_jobs
    few = store.client.exists(keys.circuit(SPEC))
    for _ in range(3):
        ended(store, JobStatus.SUCCEEDED)
    ended(store, JobStatus.FAILED)  # 3 of 6 failed: the ratio is reached
    reached = store.client.hget(keys.circuit(SPEC), "state")

    assert few == 0 and reached == b"open"


def ended_together(store: JobStore, statuses: list[JobStatus]) -> None:
    """Jobs ended by one finish script, as a worker ends a pass's jobs."""
    records = [JobRecord(uuid.uuid4().hex, SPEC.id, JobStatus.QUEUED, Lane.ASYNC, 1, 4, time.time(), "owner")
               for _ in statuses]  # fmt: skip
    for record in records:
        store.client.hset(keys.job(record.id), mapping=record.to_hash())
    claims = store.start(SPEC, [r.id for r in records], "w1")
    store.finish([(claim.record, status, {}) for claim, status in zip(claims, statuses, strict=True)])


def test_successes_ended_with_failures_in_one_script_count_before_the_failures_ratio(store):
    ended_together(store, [JobStatus.SUCCEEDED] * 4 + [JobStatus.FAILED] * 3)  # 3 of 7: below the ratio
    below = store.client.exists(keys.circuit(SPEC))
    ended_together(store, [JobStatus.FAILED] * 2)  # 5 of 9: the ratio is reached

    assert below == 0 and store.client.hget(keys.circuit(SPEC), "state") == b"open"


def test_a_failure_while_half_open_opens_the_circuit_again(store):
    store.client.hset(keys.circuit(SPEC), mapping={"state": "half_open", "opened_at": repr(time.time()), "probes": 1})

    ended(store, JobStatus.FAILED)

    assert store.client.hget(keys.circuit(SPEC), "state") == b"open"


def test_probes_are_let_through_only_after_the_cool_off_and_only_as_many_as_configured(store):
    store.client.hset(keys.circuit(SPEC), mapping={"state": "open", "opened_at": repr(time.time()), "probes": 0})
    early = store.probe(SPEC)
    store.client.hset(keys.circuit(SPEC), "opened_at", repr(time.time() - 31))
    let_through = [store.probe(SPEC) for _ in range(5)]  # BREAKER_PROBES defaults to 3

    assert early is False
    assert let_through == [True, True, True, False, False]
