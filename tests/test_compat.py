"""Drop-in for the old per-model Chronos server (docs/api.md, compat routes): its routes, shapes and the evaluation
client's call pattern, served through the same queue and workers as the native API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from api.auth import LEGACY, KeyRing
from api.main import create_app
from api.problems import Problem
from shared import catalog
from shared.store import keys

from conftest import API_KEY, BOLT, T5, forecast_body, job_keys, settings_for, start_api

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {API_KEY}"}  # how the evaluation client sends its key
BOTH = {"X-API-Key": API_KEY, **AUTH}  # how the orchestrator sends it, when its key setting is set
OWNER = KeyRing([API_KEY]).owner(API_KEY)
DECILE_KEYS = [str(p) for p in range(10, 100, 10)]


def series(n: int, seed: int = 0) -> list[float]:
    return [100.0 + ((t * 7 + seed * 13) % 23) * 0.5 for t in range(n)]


@pytest.fixture(scope="module")
def keyless_api(redis_server, tmp_path_factory) -> Iterator[str]:
    """The API as deployed with COMPAT_REQUIRE_KEY=false; yields its base URL."""
    base, proc = start_api(redis_server, tmp_path_factory.mktemp("keyless-api"), COMPAT_REQUIRE_KEY="false")
    yield base
    proc.terminate()
    proc.wait(10)


def day_body(model: str, history: list[float], i: int) -> dict:
    return {"name": "SPY", "model": model, "context_period_size": 252, "forecast_period_size": 20,
            "recent_data": history[i : i + 252], "as_of_date": f"day-{i}"}  # fmt: skip


def prices(n: int, level: float) -> list[float]:
    """A price history with no repeated 252-day window (period 997), around `level`."""
    return [level + ((t * 37) % 997) * 0.05 for t in range(n)]


async def evaluate(
    base: str, path: str, model: str, days: int, headers: dict, level: float
) -> list[tuple[httpx.Response, int]]:
    """The evaluation client: one call per trading day, 4 in flight, each failure retried twice more
    (after ~0.5 s, then ~1 s); each day's last answer and how many attempts it took."""
    history = prices(252 + days, level)
    gate = asyncio.Semaphore(4)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as http:

        async def day(i: int) -> tuple[httpx.Response, int]:
            async with gate:
                for attempt, pause in enumerate((0.5, 1.0, None), 1):
                    response = await http.post(path, json=day_body(model, history, i))
                    if response.status_code == 200 or pause is None:
                        return response, attempt
                    await asyncio.sleep(pause)

        return await asyncio.gather(*(day(i) for i in range(days)))


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


@pytest.mark.parametrize(
    ("model", "days"),
    # T5 runs one job at a time on the test worker (~0.3 s a day): 20 days show the pattern.
    [("amazon/chronos-bolt-tiny", 250), ("amazon/chronos-t5-tiny", 20)],
)
@pytest.mark.parametrize(
    ("path", "headers", "owner", "level"),
    [
        ("/v1/timeseries/forecast", {}, LEGACY, 100.0),  # keyless: the evaluator pointed straight at the server
        ("/models/{slug}/v1/timeseries/forecast", BOTH, OWNER, 200.0),  # through the orchestrator's route
        ("/v1/timeseries/forecast", AUTH, OWNER, 300.0),  # the full model id in the body, with the client's key
    ],
    ids=["keyless", "both-headers-per-model-url", "bearer-full-id"],
)  # fmt: skip
def test_evaluation_client_replay_answers_every_day_at_the_first_attempt(
    keyless_api, workers, redis_server, model, days, path, headers, owner, level
):
    """Context 252, horizon 20, 4 calls in flight, failures retried as the Go client does, against
    COMPAT_REQUIRE_KEY=false: keyless as the evaluator pointed straight at the server, and with the
    key as the orchestrator sends it (both headers, per-model base URL) or the client (bearer)."""
    spec = catalog.get(model)  # each case its own price level: each computes its forecasts, none is cached

    answers = asyncio.run(evaluate(keyless_api, path.format(slug=spec.slug), spec.id, days, headers, level))

    failed = [r for r, _ in answers if r.status_code != 200]
    assert not failed, failed[0].text
    assert [attempts for _, attempts in answers] == [1] * days
    bodies = [r.json() for r, _ in answers]
    assert all(set(b) == {"name", "forecast", "message"} for b in bodies)
    assert all(b["name"] == "SPY" and b["message"] == "Success" and len(b["forecast"]) == 20 for b in bodies)
    client = redis_server.client()
    jobs = {r.headers["x-job-id"] for r, _ in answers}
    assert len(jobs) == days
    assert {(client.hget(keys.job(j), "owner"), client.hget(keys.job(j), "model")) for j in jobs} == {(owner, spec.id)}


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


def test_a_sync_wait_for_a_model_without_a_worker_is_503_at_once_and_queues_nothing(api, workers, redis_server):
    before = job_keys(redis_server.client())
    started = time.monotonic()
    # chronos-t5-mini: the async lane (not sync-eligible); chronos-bolt-mini: the sync lane. No worker serves either.
    compat = api.post("/models/chronos-t5-mini/v1/timeseries/forecast",
                      json={"name": "SPY", "forecast_period_size": 20, "recent_data": series(252)}, headers=AUTH)  # fmt: skip
    elapsed = time.monotonic() - started
    inference = api.post("/forecast/v1/chronos/inference", json={"context": [1.0, 2.0], "prediction_length": 2})
    predict = api.post("/v1/predict", json=forecast_body("amazon/chronos-bolt-mini"))

    for response in (compat, predict):
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "no-worker" and response.headers["retry-after"]
    assert compat.json()["error"] == compat.json()["detail"]  # a legacy route: the old server's member too
    assert inference.status_code == 200  # its model (COMPAT_MODEL, t5-tiny) has a worker
    assert elapsed < 2
    assert job_keys(redis_server.client()) - before == {keys.job(inference.headers["x-job-id"])}


def test_an_async_job_is_accepted_without_a_worker_and_its_202_says_so(api, workers):
    orphan = api.post("/v1/forecasts", json=forecast_body("amazon/chronos-t5-mini"))
    served = api.post("/v1/forecasts", json=forecast_body(BOLT, length=33))
    api.delete(f"/v1/forecasts/{orphan.json()['id']}")

    assert orphan.status_code == 202 and orphan.json()["status"] == "queued"
    assert orphan.headers["x-workers-online"] == "0"
    assert served.status_code == 202 and served.headers["x-workers-online"] == "1"


RETRY_KEY = "retry-key"


@pytest.fixture()
def short_wait_api(redis_server) -> Iterator[TestClient]:
    """Compat calls wait 0.5 s; legacy routes keyless; keys API_KEY and RETRY_KEY (a caller of its own)."""
    settings = settings_for(redis_server, api_keys=f"{API_KEY},{RETRY_KEY}", compat_timeout_s=0.5,
                            compat_require_key=False, heartbeat_s=1)  # fmt: skip
    with TestClient(create_app(settings)) as api:
        yield api


def test_retries_after_a_compat_timeout_wait_on_the_one_job_and_keyless_calls_never_join_it(
    short_wait_api, workers, redis_server
):
    api, client = short_wait_api, redis_server.client()
    # The test's T5 worker runs one job at a time: while this one runs, the compat job stays queued.
    blocker = api.post("/v1/forecasts", json=forecast_body(T5, n_series=8, length=512, horizon=64, num_samples=50),
                       headers={"X-API-Key": API_KEY}).json()["id"]  # fmt: skip
    while api.get(f"/v1/forecasts/{blocker}", headers={"X-API-Key": API_KEY}).json()["status"] == "queued":
        time.sleep(0.05)
    path, body = "/models/chronos-t5-tiny/v1/timeseries/forecast", {"name": "SPY", "forecast_period_size": 20,
                                                                    "recent_data": series(252, seed=77)}  # fmt: skip
    retry_owner = KeyRing([RETRY_KEY]).owner(RETRY_KEY)

    first = api.post(path, json=body, headers={"X-API-Key": RETRY_KEY})
    retries = []
    for pause in (0.5, 1.0, 1.0):
        time.sleep(pause)
        retries.append(api.post(path, json=body, headers={"X-API-Key": RETRY_KEY}))
    keyless = api.post(path, json=body)
    owned = {k for k in job_keys(client) if client.hget(k, "owner") == retry_owner}
    service = api.app.state.service
    for job_id, owner in ((blocker, OWNER), (first.headers["x-job-id"], retry_owner),
                          (keyless.headers["x-job-id"], LEGACY)):  # fmt: skip
        with contextlib.suppress(Problem):  # 409 when it finished already: nothing left to clean up
            api.portal.call(service.cancel, job_id, owner)
    with pytest.raises(Problem) as keyed_job_for_keyless:
        api.portal.call(service.require, first.headers["x-job-id"], LEGACY)

    job_id = first.json()["job_id"]
    assert first.status_code == 504 and first.json()["code"] == "forecast-timeout"
    assert first.headers["content-type"] == "application/problem+json" and first.json()["error"]
    assert [(r.status_code, r.headers["x-job-id"]) for r in retries] == [(504, job_id)] * 3
    assert owned == {keys.job(job_id)}
    assert keyless.status_code == 504 and keyless.headers["x-job-id"] != job_id
    assert client.hget(keys.job(keyless.headers["x-job-id"]), "owner") == LEGACY
    assert keyed_job_for_keyless.value.status == 404


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
    before = set(redis_server.client().keys())

    response = api.post(path, json=body, headers=AUTH)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field and response.json()["detail"]
    # Nothing written. (Not a count of keys: an earlier test's key may expire meanwhile, as one did in a run.)
    assert set(redis_server.client().keys()) - before == set()


def test_status_of_a_model_without_workers_is_uninitialized_and_health_needs_no_key(api, workers):
    status = api.get("/models/chronos-bolt-mini/forecast/v1/chronos/status")
    del api.headers["X-API-Key"]
    health = api.get("/models/chronos-bolt-mini/health")
    default = api.get("/health")

    assert status.json()["model_status"] == "uninitialized"
    assert health.status_code == 200
    # The old server's fields, then which model this URL serves.
    assert health.json() | {"timestamp": None} == {
        "status": "healthy", "timestamp": None, "api_version": "1.0.0",
        "models": {"amazon/chronos-bolt-mini": "uninitialized"},
        "model": "amazon/chronos-bolt-mini", "model_status": "uninitialized",
    }  # fmt: skip
    assert abs(datetime.fromisoformat(health.json()["timestamp"]).timestamp() - time.time()) < 60
    assert default.json()["models"] == {T5: "ready"} and default.json()["model_status"] == "ready"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_compat_routes_need_a_key_by_default(api, headers):
    del api.headers["X-API-Key"]
    response = api.post("/v1/timeseries/forecast", headers=headers,
                        json={"name": "A", "model": BOLT, "forecast_period_size": 2, "recent_data": [1.0, 2.0]})  # fmt: skip

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "unauthorized" and response.json()["error"] == response.json()["detail"]


@pytest.fixture()
def keyless_limited_api(redis_server) -> Iterator[TestClient]:
    """Legacy routes keyless, with a small rate for their keyless callers (1 per 2 s, burst 2)."""
    settings = settings_for(redis_server, compat_require_key=False, legacy_rate_limit_per_s=0.5,
                            legacy_rate_limit_burst=2, heartbeat_s=1)  # fmt: skip
    with TestClient(create_app(settings)) as api:
        yield api


def test_keyless_calls_run_as_the_legacy_owner_under_its_own_rate_limit(keyless_limited_api, workers, redis_server):
    api, client = keyless_limited_api, redis_server.client()
    path = "/models/chronos-bolt-tiny/v1/timeseries/forecast"

    def body(i: int) -> dict:
        return {"name": "A", "forecast_period_size": 3, "recent_data": prices(40 + i, 500.0)}

    keyless = [api.post(path, json=body(i)) for i in range(3)]
    keyed = api.post(path, json=body(3), headers=AUTH)
    wrong_key = api.post(path, json=body(4), headers={"X-API-Key": "wrong"})
    native = api.post("/v1/forecasts", json=forecast_body(BOLT))
    keyed_reads_legacy_job = api.get(f"/v1/forecasts/{keyless[0].headers['x-job-id']}", headers=AUTH)

    assert [r.status_code for r in keyless] == [200, 200, 429]
    refused = keyless[2].json()
    assert refused["code"] == "rate-limited" and "keyless legacy calls" in refused["detail"]
    assert refused["error"] == refused["detail"] and keyless[2].headers["retry-after"]
    assert client.hget(keys.job(keyless[0].headers["x-job-id"]), "owner") == LEGACY
    assert keyed.status_code == 200 and client.hget(keys.job(keyed.headers["x-job-id"]), "owner") == OWNER
    assert wrong_key.status_code == 401  # a key that is sent must be valid
    assert native.status_code == 401 and "error" not in native.json()  # native routes: always a key, new shape
    assert keyed_reads_legacy_job.status_code == 404
