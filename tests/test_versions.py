"""Weights versions (GET /v1/models/{id}/versions) and requests pinned to one
(`parameters.weights_revision`), with a second real worker of the model on other weights."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared import catalog
from shared.store import JobRecord, JobStatus, Lane, keys

from conftest import API_KEY, BOLT, forecast_body, settings_for, start_worker

pytestmark = pytest.mark.integration

SPEC = catalog.get(BOLT)
SESSION_REVISION = "synthetic-seed-0"  # the session worker's (conftest)
OTHER_REVISION = "synthetic-seed-1"


def fresh_api(redis_server) -> TestClient:
    """A new app: its fleet has no heartbeats cached from a moment ago."""
    return TestClient(create_app(settings_for(redis_server, heartbeat_s=1)), headers={"X-API-Key": API_KEY})


@pytest.fixture()
def other_weights(redis_server, workers, tmp_path) -> Iterator:
    """A second worker of the session's Bolt model, on a synthetic checkpoint of another seed."""
    worker = start_worker(redis_server, tmp_path / "synthetic", BOLT, tmp_path, SYNTHETIC_SEED="1")
    yield worker
    worker.stop()


def versions(api: TestClient) -> dict[str, dict]:
    return {v["revision"]: v for v in api.get(f"/v1/models/{SPEC.slug}/versions").json()}


def test_versions_list_a_new_revision_while_its_worker_runs_and_keep_it_after_it_stops(redis_server, other_weights):
    with fresh_api(redis_server) as api:
        running = versions(api)
    other_weights.stop()
    with fresh_api(redis_server) as api:
        stopped = versions(api)

    assert running[SESSION_REVISION]["active"] and running[SESSION_REVISION]["workers"] == 1
    assert running[OTHER_REVISION] | {"first_seen": 0, "last_seen": 0} == {
        "revision": OTHER_REVISION, "kind": "synthetic", "active": True, "workers": 1, "first_seen": 0, "last_seen": 0,
    }  # fmt: skip
    assert running[SESSION_REVISION]["first_seen"] < running[OTHER_REVISION]["first_seen"]
    assert stopped[OTHER_REVISION]["active"] is False and stopped[OTHER_REVISION]["workers"] == 0
    assert stopped[OTHER_REVISION]["first_seen"] == running[OTHER_REVISION]["first_seen"]


def test_a_pinned_request_runs_only_on_a_worker_serving_its_revision(redis_server, other_weights):
    client = redis_server.client()
    with fresh_api(redis_server) as api:
        answers = [
            api.post("/v1/predict", json=forecast_body(BOLT, length=40 + k, horizon=3, weights_revision=OTHER_REVISION))
            for k in range(6)
        ]
    holders = {client.hget(keys.job(a.json()["id"]), "worker") for a in answers}

    assert [a.status_code for a in answers] == [200] * 6
    assert holders and all(f"/{other_weights.process.pid}" in holder for holder in holders)


def test_a_request_pinned_to_a_revision_no_live_worker_serves_is_refused_no_worker(redis_server, workers):
    with fresh_api(redis_server) as api:
        sync = api.post("/v1/predict", json=forecast_body(BOLT, horizon=3, weights_revision="synthetic-seed-99"))
        queued = api.post("/v1/forecasts", json=forecast_body(BOLT, horizon=3, weights_revision="synthetic-seed-99"))
        unpinned = api.post("/v1/predict", json=forecast_body(BOLT, horizon=3))

    assert sync.status_code == 503 and sync.json()["code"] == "no-worker" and "synthetic-seed-99" in sync.json()["detail"]
    assert queued.status_code == 503 and queued.json()["code"] == "no-worker"
    assert unpinned.status_code == 200


def test_a_pinned_job_that_reaches_a_worker_of_another_revision_fails_saying_so(redis_server, workers):
    from shared.celery_app import make_celery, send_jobs

    client = redis_server.client()
    job_id = uuid.uuid4().hex
    record = JobRecord(job_id, SPEC.id, JobStatus.QUEUED, Lane.ASYNC, 1, 3, time.time(), "owner",
                       request={"parameters": {"prediction_length": 3, "weights_revision": "synthetic-seed-99"}})  # fmt: skip
    client.hset(keys.job(job_id), mapping=record.to_hash())
    send_jobs(make_celery(settings_for(redis_server)), SPEC, Lane.ASYNC, [job_id])  # the model's queue, not the pin's
    deadline = time.monotonic() + 60
    while client.hget(keys.job(job_id), "status") in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)

    status, error = client.hmget(keys.job(job_id), "status", "error")
    assert status == "failed"
    assert "pins weights revision synthetic-seed-99" in error and SESSION_REVISION in error
