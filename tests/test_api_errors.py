"""Bad input gets a clear problem+json error naming the field, and changes nothing in Redis."""

from __future__ import annotations

import json

import pytest

from shared import catalog
from shared.store import keys

from conftest import BOLT, forecast_body, job_keys

PROBLEM = "application/problem+json"


def queue_lengths(client) -> dict[str, int]:
    return {q: client.llen(q) for spec in catalog.CATALOG for q in keys.worker_queues(spec)}


@pytest.fixture()
def unchanged(redis_server):
    """Asserts that the test's requests left no job record and no queued message behind."""
    client = redis_server.client()
    jobs, queues = job_keys(client), queue_lengths(client)
    yield
    assert job_keys(client) == jobs
    assert queue_lengths(client) == queues


def with_params(**params) -> dict:
    body = forecast_body(BOLT)
    body["parameters"].update(params)
    return body


def with_target(target) -> dict:
    body = forecast_body(BOLT)
    body["inputs"][0]["target"] = target
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (with_target([]), "inputs[0].target"),
        (with_target([1.0, "abc", 3.0]), "inputs[0].target[1]"),
        (with_target([None, None]), "inputs[0].target"),
        (with_params(prediction_length=0), "parameters.prediction_length"),
        (with_params(prediction_length=-3), "parameters.prediction_length"),
        (with_params(quantile_levels=[0.5, 1.0]), "parameters.quantile_levels"),
        (with_params(quantile_levels=[0.0]), "parameters.quantile_levels"),
        (with_params(quantile_levels=[0.5, 0.5]), "parameters.quantile_levels"),
        (with_params(num_samples=0), "parameters.num_samples"),
        (with_params(top_p=1.5), "parameters.top_p"),
        ({"model": BOLT, "inputs": [], "parameters": {"prediction_length": 3}}, "inputs"),
        ({"model": BOLT, "inputs": [{"target": [1.0]}]}, "parameters"),
        ({"model": BOLT, "inputs": [{"target": [1.0]}], "parameters": {"prediction_length": 3, "horizon": 2}}, "parameters.horizon"),
    ],
)  # fmt: skip
def test_invalid_request_is_422_naming_the_field(api, unchanged, body, field):
    response = api.post("/v1/forecasts", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["field"] == field
    assert problem["status"] == 422 and problem["type"].endswith("validation-error")
    assert problem["detail"]


@pytest.mark.parametrize("param", [{"temperature": 0.8}, {"num_samples": 10}, {"return_samples": True}])
def test_sampling_options_for_a_model_that_does_not_sample_are_422(api, unchanged, param):
    response = api.post("/v1/forecasts", json=with_params(**param))

    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "not-sample-based" and problem["field"] == f"parameters.{next(iter(param))}"
    assert "T5" in problem["detail"]


def test_infinite_target_value_is_422(api, unchanged):
    # JSON has no Infinity literal, but Python's parser (and many clients) emit one.
    raw = json.dumps(forecast_body(BOLT)).replace("[0.0, 1.0", "[Infinity, 1.0", 1)
    response = api.post("/v1/forecasts", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["field"] == "inputs[0].target"
    assert "infinite" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (forecast_body(BOLT, n_series=4, length=10), "inputs"),
        (forecast_body(BOLT, n_series=1, length=51), "inputs[0].target"),
        (forecast_body(BOLT, n_series=3, length=49), "inputs[2].target"),  # 49, 50, 51 points: the last
        (forecast_body(BOLT, length=10, horizon=31), "parameters.prediction_length"),
        (forecast_body(BOLT, length=10, num_samples=11), "parameters.num_samples"),
    ],
)
def test_request_over_a_configured_limit_is_422(small_limits_api, unchanged, body, field):
    response = small_limits_api.post("/v1/forecasts", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "limit-exceeded"
    assert response.json()["field"] == field


def test_body_over_size_limit_is_413(small_limits_api, unchanged):
    response = small_limits_api.post("/v1/forecasts", json=forecast_body(BOLT, n_series=1, length=2000))
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "body-too-large"


def test_streamed_body_over_size_limit_is_413(small_limits_api, unchanged):
    def chunks():  # no Content-Length: the limit must hold while streaming too
        yield b'{"model": "amazon/chronos-bolt-tiny", "inputs": [{"target": ['
        for _ in range(500):
            yield b"1.0, " * 10
        yield b'1.0]}], "parameters": {"prediction_length": 3}}'

    response = small_limits_api.post("/v1/forecasts", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_unknown_model_is_404(api, unchanged):
    response = api.post("/v1/forecasts", json=forecast_body("amazon/chronos-t5-huge"))
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "unknown-model"
    assert response.json()["field"] == "model"


def test_malformed_json_is_400(api, unchanged):
    response = api.post("/v1/forecasts", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["code"] == "malformed-json"


def test_sync_predict_on_a_non_eligible_model_is_409_naming_the_async_endpoint(api, unchanged):
    response = api.post("/v1/predict", json=forecast_body("amazon/chronos-t5-small"))
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "not-sync-eligible"
    assert "POST /v1/forecasts" in response.json()["detail"]


def test_sync_predict_with_no_worker_online_is_503_without_queueing(api, unchanged):
    response = api.post("/v1/predict", json=forecast_body("amazon/chronos-bolt-base"))
    assert response.status_code == 503
    assert response.json()["code"] == "no-worker"
    assert int(response.headers["retry-after"]) > 0


def test_unknown_job_is_404_problem(api):
    for method in ("get", "delete"):
        response = getattr(api, method)("/v1/forecasts/0123456789abcdef")
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["code"] == "unknown-job"


def test_unknown_route_is_404_problem(api):
    response = api.get("/v2/nothing")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM


def test_missing_values_as_null_and_nan_are_accepted(api, redis_server):
    raw = json.dumps(forecast_body("amazon/chronos-bolt-mini")).replace("[0.0, 1.0", "[NaN, null", 1)
    response = api.post("/v1/forecasts", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text
    # Nobody serves bolt-mini in this session: cancel so the queue holds no live job.
    assert api.delete(f"/v1/forecasts/{response.json()['id']}").json()["status"] == "cancelled"
