"""The result cache: identical deterministic requests are answered from Redis, marked `cached`."""

from __future__ import annotations

from shared.store import keys

from conftest import BOLT, OTHER_KEY, T5, forecast_body, wait_for


def run(api, body: dict, **headers) -> dict:
    answer = api.post("/v1/forecasts", json=body, headers=headers)
    assert answer.status_code == 202, answer.text
    return answer.json()


def test_an_identical_bolt_request_is_answered_at_once_from_the_cache(api, workers, redis_server):
    body = forecast_body(BOLT, n_series=2, length=70, horizon=6)
    first = wait_for(api, run(api, body)["id"])

    again = run(api, body)
    other_key = run(api, body, **{"X-API-Key": OTHER_KEY})
    changed = run(api, forecast_body(BOLT, n_series=2, length=70, horizon=7))

    assert first["status"] == "succeeded" and first["cached"] is False
    # A hit is final in the 202 itself: no queue, no worker.
    assert again["status"] == "succeeded" and again["cached"] is True and again["id"] != first["id"]
    assert again["predictions"] == first["predictions"] and again["weights"] == first["weights"]
    assert again["timings"]["inference_s"] == 0.0
    assert api.get(f"/v1/forecasts/{again['id']}").json()["cached"] is True
    # The cache is per API key by default: a hit would tell another key that someone sent these series.
    assert other_key["cached"] is False
    assert changed["status"] == "queued" and changed["cached"] is False


def test_a_large_request_is_looked_up_before_its_series_are_sent_and_a_hit_sends_none(
    api, workers, redis_server, monkeypatch
):
    from api.service import CACHE_LOOKUP_FIRST_BYTES
    from shared.store import AsyncJobStore

    body = forecast_body(BOLT, n_series=12, length=2000, horizon=4)  # 12 x 2000 float32: past the threshold
    assert 12 * 2000 * 4 > CACHE_LOOKUP_FIRST_BYTES
    first = wait_for(api, run(api, body)["id"])
    created = []
    create = AsyncJobStore.create
    monkeypatch.setattr(AsyncJobStore, "create", lambda store, *args: created.append(args) or create(store, *args))

    again = run(api, body)

    assert first["status"] == "succeeded" and again["status"] == "succeeded" and again["cached"] is True
    assert again["predictions"] == first["predictions"]
    assert created == []  # answered by create-from-cache alone: the series never went to Redis


def test_with_a_global_cache_scope_another_key_gets_the_cached_answer(redis_server, workers):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from conftest import API_KEY, settings_for

    body = forecast_body(BOLT, n_series=1, length=71, horizon=5)
    app = create_app(settings_for(redis_server, heartbeat_s=1, cache_scope="global"))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as api:
        first = wait_for(api, run(api, body)["id"])
        other_key = run(api, body, **{"X-API-Key": OTHER_KEY})

    assert first["cached"] is False
    assert other_key["cached"] is True and other_key["predictions"] == first["predictions"]


def test_the_sync_predict_serves_cache_hits_too(api, workers):
    body = forecast_body(BOLT, length=50, horizon=3)
    first = api.post("/v1/predict", json=body).json()

    second = api.post("/v1/predict", json=body)

    assert second.status_code == 200 and second.json()["cached"] is True
    assert second.json()["predictions"] == first["predictions"]


def test_t5_is_cached_only_when_its_sampling_is_seeded_and_a_seed_reproduces_the_samples(api, workers):
    unseeded = forecast_body(T5, length=40, horizon=4, num_samples=5)
    seeded = forecast_body(T5, length=40, horizon=4, num_samples=5, seed=42)
    renamed = forecast_body(T5, length=40, horizon=4, num_samples=5, seed=42)
    renamed["inputs"][0]["item_id"] = "renamed"  # echoed back, so part of the key: this one runs

    wait_for(api, run(api, unseeded)["id"])
    assert run(api, unseeded)["cached"] is False
    first = wait_for(api, run(api, seeded)["id"])
    hit = run(api, seeded)
    rerun = wait_for(api, run(api, renamed)["id"])

    assert hit["cached"] is True and hit["predictions"] == first["predictions"]
    assert rerun["cached"] is False
    assert {k: v for k, v in rerun["predictions"][0].items() if k != "item_id"} == {
        k: v for k, v in first["predictions"][0].items() if k != "item_id"
    }


def test_seed_on_a_bolt_model_is_refused_as_a_sampling_option(api):
    answer = api.post("/v1/forecasts", json=forecast_body(BOLT, seed=1))

    assert answer.status_code == 422 and answer.json()["field"] == "parameters.seed"


def test_nothing_is_cached_when_the_cache_is_off(redis_server, workers):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from conftest import API_KEY, settings_for

    body = forecast_body(BOLT, length=44, horizon=2)
    settings = settings_for(redis_server, heartbeat_s=1, cache_ttl_s=0)
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as api:
        wait_for(api, run(api, body)["id"])
        assert run(api, body)["cached"] is False
    assert list(redis_server.client().scan_iter(keys.cache("*")))  # the worker still stores; this API does not look


def test_an_identical_backtest_is_answered_from_the_cache(api, workers):
    body = {
        "model": BOLT,
        "series": {"target": [float(10 + t % 6) for t in range(90)]},
        "origins": {"first": 60, "last": 90, "step": 3},
        "parameters": {"prediction_length": 4},
    }
    first = api.post("/v1/backtests", json=body).json()
    first = api.get(f"/v1/backtests/{first['id']}", params={"wait": 30}).json()

    again = api.post("/v1/backtests", json=body).json()

    assert first["status"] == "succeeded" and again["cached"] is True and again["status"] == "succeeded"
    assert again["backtest"] == first["backtest"] and again["progress"] == {"done": 11, "total": 11}


def test_identical_requests_in_flight_share_one_job_and_only_when_the_answer_cannot_differ(api):
    """Single-flight (single-flight, api/service.py). No worker serves these models here, so every job stays queued."""
    bolt = forecast_body("amazon/chronos-bolt-mini", length=61)
    seeded = forecast_body("amazon/chronos-t5-mini", length=61, seed=7)
    unseeded = forecast_body("amazon/chronos-t5-mini", length=61)

    first, again = run(api, bolt), run(api, bolt)
    other_key = run(api, bolt, **{"X-API-Key": OTHER_KEY})
    keyed_once = run(api, bolt, **{"Idempotency-Key": "sf-1"})
    keyed_again = run(api, bolt, **{"Idempotency-Key": "sf-2"})
    seeded_ids = {run(api, seeded)["id"] for _ in range(2)}
    unseeded_ids = {run(api, unseeded)["id"] for _ in range(2)}
    api.delete(f"/v1/forecasts/{first['id']}")
    after_it_ended = run(api, bolt)
    for job in (after_it_ended, keyed_once, keyed_again, *({"id": i} for i in seeded_ids | unseeded_ids)):
        api.delete(f"/v1/forecasts/{job['id']}")
    api.delete(f"/v1/forecasts/{other_key['id']}", headers={"X-API-Key": OTHER_KEY})

    assert again["id"] == first["id"] and again["status"] == "queued"
    assert other_key["id"] != first["id"]  # another owner's job is never joined
    assert len({first["id"], keyed_once["id"], keyed_again["id"]}) == 3  # an Idempotency-Key decides instead
    assert len(seeded_ids) == 1 and len(unseeded_ids) == 2  # T5 only with a seed
    assert after_it_ended["id"] != first["id"]  # a cancelled (ended) job is not joined


def test_a_cache_entry_whose_results_expired_is_not_served_the_request_runs(api, workers, redis_server):
    body = forecast_body(BOLT, n_series=2, length=72, horizon=5)
    first = wait_for(api, run(api, body)["id"])
    client = redis_server.client()
    for key in client.scan_iter(keys.cache_output("*")):  # the results expire before the entry that names them
        client.delete(key)

    again = wait_for(api, run(api, body)["id"])

    assert first["status"] == again["status"] == "succeeded"
    assert again["cached"] is False and again["predictions"] == first["predictions"]
