"""The serving design's `POST /predict` (one series) and `POST /predict/batch` (many, as `requests`)
answer as `/v1/predict` does, through the same lane and the same workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app

from conftest import API_KEY, BOLT, T5, forecast_body, job_keys, settings_for, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture()
def uncached(redis_server) -> Iterator[TestClient]:
    """The API without its result cache: every request below is computed by a worker, so equal
    answers mean equal forecasts, not one answer served twice."""
    with TestClient(create_app(settings_for(redis_server, heartbeat_s=1, cache_ttl_s=0)),
                    headers={"X-API-Key": API_KEY}) as client:  # fmt: skip
        yield client


def predicted(response) -> list[dict]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded" and body["lane"] == "sync" and body["cached"] is False
    return body["predictions"]


def assert_same_forecasts(got: list[dict], expected: list[dict]) -> None:
    assert [p["item_id"] for p in got] == [p["item_id"] for p in expected]
    for a, b in zip(got, expected, strict=True):
        assert set(a) == set(b)
        for key in ("mean", "0.1", "0.5", "0.9"):
            assert a[key] == pytest.approx(b[key], rel=1e-6)


def test_predict_forecasts_one_series_as_v1_predict_does(uncached, workers):
    native = forecast_body(BOLT, n_series=1, length=50, horizon=6)
    (series,) = native["inputs"]
    one = {"model": BOLT, "input": series, "parameters": native["parameters"]}

    expected = predicted(uncached.post("/v1/predict", params={"timeout": 30}, json=native))
    got = predicted(uncached.post("/predict", params={"timeout": 30}, json=one))

    assert len(got) == 1 and len(got[0]["0.5"]) == 6
    assert_same_forecasts(got, expected)


@pytest.mark.parametrize("list_name", ["requests", "inputs"])
def test_predict_batch_forecasts_its_requests_in_order_as_v1_predict_does(uncached, workers, list_name):
    native = forecast_body(BOLT, n_series=3, length=40, horizon=5)
    batch = {"model": BOLT, list_name: native["inputs"], "parameters": native["parameters"]}

    expected = predicted(uncached.post("/v1/predict", params={"timeout": 30}, json=native))
    got = predicted(uncached.post("/predict/batch", params={"timeout": 30}, json=batch))

    assert [p["item_id"] for p in got] == ["s0", "s1", "s2"]
    assert_same_forecasts(got, expected)


def test_predict_takes_a_native_inputs_list_of_one_series(uncached, workers):
    response = uncached.post("/predict", params={"timeout": 30}, json=forecast_body(BOLT, horizon=3))

    assert [len(p["mean"]) for p in predicted(response)] == [3]


def test_a_predict_timeout_answers_202_with_the_job_to_poll_as_v1_predict_does(api, workers):
    slow = forecast_body(T5, n_series=4, horizon=30, num_samples=20)
    batch = {"model": T5, "requests": slow["inputs"], "parameters": slow["parameters"]}

    response = api.post("/predict/batch", params={"timeout": 0.05}, json=batch)

    assert response.status_code == 202
    assert response.headers["location"] == f"/v1/forecasts/{response.json()['id']}"
    assert response.json()["lane"] == "sync"
    assert wait_for(api, response.json()["id"])["status"] == "succeeded"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/predict", {"inputs": forecast_body(n_series=2)["inputs"]}, "inputs"),
        ("/predict", {"requests": forecast_body()["inputs"]}, "requests"),
        ("/predict/batch", {"input": forecast_body()["inputs"][0]}, "input"),
        ("/predict/batch", {"requests": forecast_body()["inputs"], "inputs": forecast_body()["inputs"]}, "inputs"),
        ("/predict/batch", {}, "requests"),
        ("/predict/batch", {"requests": [{"target": [1.0, 2.0]}, {"target": [1.0, "2"]}]}, "requests[1].target[1]"),
        ("/predict", {"input": {"target": [1.0, None, 3.0], "past_covariates": {"x": [1.0, 2.0, 3.0]}}},
         "input.past_covariates"),
    ],
    ids=["two-series-on-predict", "requests-on-predict", "input-on-batch", "both-names", "no-series",
         "a-string-number", "covariates-for-bolt"],
)  # fmt: skip
def test_a_body_of_the_wrong_shape_is_422_naming_the_field_and_queues_nothing(api, redis_server, path, body, field):
    before = job_keys(redis_server.client())

    response = api.post(path, json={"model": BOLT, "parameters": {"prediction_length": 2}, **body})

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field
    assert job_keys(redis_server.client()) == before


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
def test_the_key_is_checked_before_the_body_is_read(api, path):
    del api.headers["X-API-Key"]

    response = api.post(path, content=b'{"model": "amazon/chronos-bolt-tiny", "input": {"target": [1,',
                        headers={"content-type": "application/json"})  # fmt: skip

    assert response.status_code == 401  # not 400: the malformed body was never parsed
    assert response.json()["code"] == "unauthorized"


def test_the_aliases_are_documented_with_example_bodies(api):
    paths = api.get("/openapi.json").json()["paths"]

    for path, name in (("/predict", "input"), ("/predict/batch", "requests")):
        operation = paths[path]["post"]
        schema_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = api.get("/openapi.json").json()["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
        assert name in schema["required"] and schema["examples"][0][name]
        assert "200" in operation["responses"] and "403" in operation["responses"]
