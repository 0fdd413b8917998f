"""Admission: per-key rate limit and in-flight cap (429), per-model queue cap (503), Idempotency-Key.
Every refusal is problem+json with Retry-After and leaves nothing queued."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared.store import keys

from conftest import forecast_body, job_keys, settings_for

QUEUED_MODEL = "amazon/chronos-bolt-mini"  # no worker serves it in the tests: its jobs stay queued


@pytest.fixture()
def open_api(redis_server, request) -> Iterator[TestClient]:
    """An API with the test's own limits and a key of its own (so no other test's jobs count)."""
    key = f"key-{uuid.uuid4().hex}"
    app = create_app(settings_for(redis_server, api_keys=key, **getattr(request, "param", {})))
    with TestClient(app, headers={"X-API-Key": key}) as client:
        yield client
        for job_id in getattr(client, "created", []):
            client.delete(f"/v1/forecasts/{job_id}")


_distinct = itertools.count()


def submit(api: TestClient, body: dict | None = None, **headers):
    # A different request each time: identical ones in flight would share one job (single-flight, api/service.py).
    body = body or forecast_body(QUEUED_MODEL, length=20 + next(_distinct))
    response = api.post("/v1/forecasts", json=body, headers=headers)
    if response.status_code == 202:
        api.created = [*getattr(api, "created", []), response.json()["id"]]
    return response


@pytest.mark.parametrize("open_api", [{"rate_limit_per_s": 0.5, "rate_limit_burst": 3}], indirect=True)
def test_submissions_over_the_keys_rate_are_429_with_retry_after_and_queue_nothing(open_api, redis_server):
    accepted = [submit(open_api) for _ in range(3)]
    before = job_keys(redis_server.client())

    refused = submit(open_api)

    assert [r.status_code for r in accepted] == [202] * 3
    assert refused.status_code == 429 and refused.json()["code"] == "rate-limited"
    assert refused.headers["content-type"] == "application/problem+json"
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert job_keys(redis_server.client()) == before


@pytest.mark.parametrize("open_api", [{"max_in_flight": 2}], indirect=True)
def test_a_key_with_max_in_flight_unfinished_jobs_is_429_until_one_finishes(open_api):
    first, second = submit(open_api), submit(open_api)

    refused = submit(open_api)
    open_api.delete(f"/v1/forecasts/{first.json()['id']}")  # a cancelled job is finished
    after = submit(open_api)

    assert refused.status_code == 429 and refused.json()["code"] == "too-many-in-flight"
    assert refused.headers["retry-after"]
    assert second.status_code == 202 and after.status_code == 202


@pytest.mark.parametrize("open_api", [{"max_queue_depth": 2}], indirect=True)
def test_a_model_queue_at_its_cap_is_503_with_retry_after(open_api, redis_server):
    client = redis_server.client()
    depth = client.llen("chronos-bolt-mini")
    while depth < 2:
        assert submit(open_api).status_code == 202
        depth = client.llen("chronos-bolt-mini")

    refused = submit(open_api)

    assert refused.status_code == 503 and refused.json()["code"] == "queue-full"
    assert refused.headers["retry-after"] == "5"
    assert client.llen("chronos-bolt-mini") == depth


def test_the_same_idempotency_key_and_body_return_the_same_job(open_api, redis_server):
    body = forecast_body(QUEUED_MODEL)
    first = submit(open_api, body, **{"Idempotency-Key": "order-42"})
    depth = redis_server.client().llen("chronos-bolt-mini")

    again = submit(open_api, body, **{"Idempotency-Key": "order-42"})

    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert redis_server.client().llen("chronos-bolt-mini") == depth  # nothing queued twice


def test_the_same_idempotency_key_with_another_body_is_422_naming_the_header(open_api):
    first = submit(open_api, forecast_body(QUEUED_MODEL, horizon=4), **{"Idempotency-Key": "order-43"})

    other = submit(open_api, forecast_body(QUEUED_MODEL, horizon=5), **{"Idempotency-Key": "order-43"})

    assert other.status_code == 422
    assert other.json()["code"] == "idempotency-key-reused" and other.json()["field"] == "Idempotency-Key"
    assert other.json()["job_id"] == first.json()["id"]


def test_idempotency_keys_belong_to_their_api_key(redis_server):
    keys = [f"key-{uuid.uuid4().hex}" for _ in range(2)]
    app = create_app(settings_for(redis_server, api_keys=",".join(keys)))
    body = forecast_body(QUEUED_MODEL)
    with TestClient(app) as client:
        ids = [client.post("/v1/forecasts", json=body, headers={"X-API-Key": k, "Idempotency-Key": "same"}).json()["id"]
               for k in keys]  # fmt: skip
        for k, job_id in zip(keys, ids, strict=True):
            client.delete(f"/v1/forecasts/{job_id}", headers={"X-API-Key": k})

    assert ids[0] != ids[1]


def test_a_job_is_created_once_even_when_redis_has_lost_its_scripts(open_api, redis_server):
    client = redis_server.client()
    client.script_flush()

    answer = submit(open_api, forecast_body(QUEUED_MODEL, n_series=3, length=77))

    assert answer.status_code == 202
    assert client.llen(keys.job_input(answer.json()["id"])) == 3  # the series were pushed once
