"""Drop-in for the old per-model Chronos server (DESIGN §4): its routes, shapes and the evaluation
client's call pattern, served through the same queue and workers as the native API."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import API_KEY, BOLT, T5

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {API_KEY}"}  # how the evaluation client sends its key
DECILE_KEYS = [str(p) for p in range(10, 100, 10)]


def series(n: int, seed: int = 0) -> list[float]:
    return [100.0 + ((t * 7 + seed * 13) % 23) * 0.5 for t in range(n)]


def test_initialization_status_inference_sequence_has_the_old_shapes(api, workers):
    init = api.post("/forecast/v1/chronos/initialization", json={}, headers=AUTH)
    status = api.get("/forecast/v1/chronos/status", headers=AUTH)
    body = {"context": series(60), "prediction_length": 7, "num_samples": 12, "temperature": 0.9, "top_k": 40}
    inference = api.post("/forecast/v1/chronos/inference", json=body, headers=AUTH)

    assert init.status_code == 200, init.text
    assert init.json() == {
        "message": "Model initialized successfully",
        "model_status": "ready",
        "model_info": {"model_variant": T5, "device": "cpu", "status": "ready"},
    }
    assert status.json()["model_status"] == "ready" and T5 in status.json()["details"]
    assert inference.status_code == 200, inference.text
    out = inference.json()
    assert set(out) == {"prediction", "execution_metadata"}
    prediction = out["prediction"]
    assert set(prediction) == {"median", "mean", "quantiles", "samples", "metadata"}
    assert list(prediction["quantiles"]) == DECILE_KEYS
    assert all(len(v) == 7 for v in [prediction["median"], prediction["mean"], *prediction["quantiles"].values()])
    assert len(prediction["samples"]) == 12 and all(len(path) == 7 for path in prediction["samples"])
    assert prediction["median"] == prediction["quantiles"]["50"]
    # The statistics are those of the returned samples, as the old server computed them.
    first_step = sorted(path[0] for path in prediction["samples"])
    assert first_step[0] <= prediction["quantiles"]["10"][0] <= prediction["quantiles"]["90"][0] <= first_step[-1]
    assert prediction["mean"][0] == pytest.approx(sum(first_step) / 12, rel=1e-5)
    assert prediction["metadata"] | {"inference_time_seconds": None} == {
        "context_length": 60, "prediction_length": 7, "num_samples": 12, "model_variant": T5,
        "inference_time_seconds": None,
    }  # fmt: skip
    assert set(out["execution_metadata"]) == {"total_time_seconds", "model_version", "api_version"}
    assert out["execution_metadata"]["model_version"] == T5
    assert inference.headers["x-chronos-weights"] == "synthetic"


def test_bolt_under_its_model_prefix_returns_model_quantiles_and_no_samples(api, workers):
    context = series(80, seed=3)
    compat = api.post(
        "/models/chronos-bolt-tiny/forecast/v1/chronos/inference",
        json={"context": context, "prediction_length": 5},
        headers=AUTH,
    )
    native = api.post(
        "/v1/predict",
        json={
            "model": BOLT,
            "inputs": [{"target": context}],
            "parameters": {"prediction_length": 5, "quantile_levels": [0.1, 0.5, 0.9]},
        },
    )

    assert compat.status_code == 200, compat.text
    prediction = compat.json()["prediction"]
    assert prediction["samples"] == [] and prediction["metadata"]["num_samples"] == 0
    assert prediction["metadata"]["model_variant"] == BOLT
    (forecast,) = native.json()["predictions"]
    assert prediction["median"] == forecast["0.5"]
    assert prediction["quantiles"]["10"] == forecast["0.1"] and prediction["quantiles"]["90"] == forecast["0.9"]


def test_evaluation_client_pattern_250_calls_four_at_a_time_each_answered_with_20_steps(live_api, workers):
    """About 250 trading days, context 252, horizon 20, 4 calls in flight, as the Go client runs them."""
    history = series(252 + 250)

    async def replay() -> list[httpx.Response]:
        gate = asyncio.Semaphore(4)
        async with httpx.AsyncClient(base_url=live_api, headers=AUTH, timeout=300) as http:

            async def day(i: int) -> httpx.Response:
                async with gate:
                    return await http.post(
                        "/models/chronos-bolt-tiny/v1/timeseries/forecast",
                        json={
                            "name": "SPY",
                            "model": "ignored-under-a-model-prefix",
                            "context_period_size": 252,
                            "forecast_period_size": 20,
                            "recent_data": history[i : i + 252],
                            "as_of_date": f"day-{i}",
                        },
                    )

            return await asyncio.gather(*(day(i) for i in range(250)))

    responses = asyncio.run(replay())

    assert [r.status_code for r in responses] == [200] * 250, next(r.text for r in responses if r.status_code != 200)
    bodies = [r.json() for r in responses]
    assert all(set(b) == {"name", "forecast", "message"} for b in bodies)
    assert all(b["name"] == "SPY" and b["message"] == "Success" and len(b["forecast"]) == 20 for b in bodies)


def test_unprefixed_timeseries_forecast_takes_the_model_from_the_body(api, workers):
    response = api.post(
        "/v1/timeseries/forecast",
        json={"name": "QQQ", "model": "chronos-t5-tiny", "context_period_size": 40, "forecast_period_size": 3,
              "recent_data": series(40)},
        headers=AUTH,
    )  # fmt: skip

    assert response.status_code == 200, response.text
    assert response.json()["name"] == "QQQ" and len(response.json()["forecast"]) == 3
    job = api.get(f"/v1/forecasts/{response.headers['x-job-id']}").json()
    assert job["model"] == T5 and job["lane"] == "sync"


def test_context_period_size_uses_only_the_latest_points(api, workers):
    data = series(300, seed=5)

    def forecast(recent: list[float], context: int | None) -> list[float]:
        body = {"name": "X", "forecast_period_size": 4, "recent_data": recent}
        if context:
            body["context_period_size"] = context
        response = api.post("/models/chronos-bolt-tiny/v1/timeseries/forecast", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        return response.json()["forecast"]

    assert forecast(data, 100) == forecast(data[-100:], None)


def test_a_compat_call_that_outlasts_its_wait_is_504_with_the_job_id_and_the_job_goes_on(redis_server):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from conftest import settings_for

    app = create_app(settings_for(redis_server, compat_timeout_s=0.3, heartbeat_s=1))
    with TestClient(app, headers=AUTH) as api:
        # chronos-t5-mini: async lane (not sync-eligible) and no worker in this session.
        response = api.post(
            "/models/chronos-t5-mini/forecast/v1/chronos/inference",
            json={"context": [1.0, 2.0], "prediction_length": 2},
        )
        job_id = response.json().get("job_id")
        job = api.get(f"/v1/forecasts/{job_id}").json()
        api.delete(f"/v1/forecasts/{job_id}")

    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-job-id"] == job_id
    assert job["status"] == "queued" and job["model"] == "amazon/chronos-t5-mini"


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/forecast/v1/chronos/inference", {"prediction_length": 3}, 422, "context"),
        ("/forecast/v1/chronos/inference", {"context": [1.0], "prediction_length": 0}, 422, "prediction_length"),
        ("/forecast/v1/chronos/inference", {"context": [1.0], "prediction_length": 3, "top_p": 2}, 422, "top_p"),
        ("/v1/timeseries/forecast", {"name": "A", "forecast_period_size": 3, "recent_data": [1.0]}, 422, "model"),
        ("/v1/timeseries/forecast", {"name": "A", "model": "nope", "forecast_period_size": 3, "recent_data": [1.0]},
         404, "model"),
        ("/models/nope/forecast/v1/chronos/inference", {"context": [1.0], "prediction_length": 3}, 404, "model"),
        ("/forecast/v1/chronos/initialization", {"model_variant": "amazon/chronos-bolt-base"}, 409, "model_variant"),
    ],
)  # fmt: skip
def test_bad_compat_requests_are_problems_naming_the_field(api, redis_server, path, body, status, field):
    before = redis_server.client().dbsize()

    response = api.post(path, json=body, headers=AUTH)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field and response.json()["detail"]
    assert redis_server.client().dbsize() == before


def test_status_of_a_model_without_workers_is_uninitialized_and_health_needs_no_key(api):
    status = api.get("/models/chronos-bolt-mini/forecast/v1/chronos/status")
    del api.headers["X-API-Key"]
    health = api.get("/models/chronos-bolt-mini/health")

    assert status.json()["model_status"] == "uninitialized"
    assert health.status_code == 200
    assert health.json() == {"status": "healthy", "model": "amazon/chronos-bolt-mini", "model_status": "uninitialized"}


def test_compat_routes_need_a_key(api):
    response = api.post(
        "/forecast/v1/chronos/inference",
        json={"context": [1.0], "prediction_length": 2},
        headers={"X-API-Key": "wrong"},
    )

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
