"""A forecast goes in over HTTP, through a per-model Celery queue to a real worker, and comes back."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

from shared import catalog
from shared.store import keys

from conftest import API_KEY, BOLT, T5, forecast_body, settings_for, wait_for

pytestmark = pytest.mark.integration


def submit(api, body) -> dict:
    response = api.post("/v1/forecasts", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/forecasts/{response.json()['id']}"
    return response.json()


def test_async_job_succeeds_with_one_forecast_per_series_of_the_requested_shape(api, workers):
    body = forecast_body(BOLT, n_series=3, horizon=12, quantile_levels=[0.1, 0.5, 0.9])
    body["inputs"][1]["target"][5] = None  # missing values are allowed
    job = submit(api, body)
    assert job["status"] == "queued"

    done = wait_for(api, job["id"])

    assert done["status"] == "succeeded", done
    assert done["weights"] == "synthetic"
    assert [p["item_id"] for p in done["predictions"]] == ["s0", "s1", "s2"]
    for forecast in done["predictions"]:
        assert set(forecast) == {"item_id", "mean", "0.1", "0.5", "0.9"}
        for key in ("mean", "0.1", "0.5", "0.9"):
            assert len(forecast[key]) == 12
            assert all(math.isfinite(v) for v in forecast[key])
    timings = done["timings"]
    assert timings["queued_s"] >= 0 and timings["inference_s"] > 0
    assert timings["total_s"] >= timings["inference_s"]


def test_t5_job_succeeds_with_requested_samples(api, workers):
    job = submit(api, forecast_body(T5, n_series=2, length=40, horizon=5, num_samples=4, quantile_levels=[0.5]))
    done = wait_for(api, job["id"])
    assert done["status"] == "succeeded", done
    assert [len(p["0.5"]) for p in done["predictions"]] == [5, 5]
    assert all("samples" not in p for p in done["predictions"])


def test_t5_returns_its_sample_paths_when_asked_and_the_quantiles_are_theirs(api, workers):
    body = forecast_body(T5, length=40, horizon=3, num_samples=6, quantile_levels=[0.5], return_samples=True)
    done = wait_for(api, submit(api, body)["id"])

    (forecast,) = done["predictions"]
    assert len(forecast["samples"]) == 6 and all(len(path) == 3 for path in forecast["samples"])
    for step in range(3):
        values = sorted(path[step] for path in forecast["samples"])
        # float32 on both sides, averaged in a different order: 1e-6 was a few ulps short (1 run in ~20).
        assert forecast["0.5"][step] == pytest.approx((values[2] + values[3]) / 2, rel=1e-5)


def test_long_wait_answers_as_soon_as_the_job_finishes(api, workers):
    job = submit(api, forecast_body(T5, n_series=1, horizon=20, num_samples=20))
    started = time.monotonic()
    response = api.get(f"/v1/forecasts/{job['id']}", params={"wait": 30})
    answered_at = time.time()
    body = response.json()
    assert body["status"] == "succeeded"
    assert time.monotonic() - started < 25  # answered by the event, not the wait running out
    assert answered_at - body["finished_at"] < 0.5


def test_sync_predict_returns_the_forecast_in_one_round_trip(api, workers):
    response = api.post("/v1/predict", params={"timeout": 30}, json=forecast_body(BOLT, n_series=2, horizon=6))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded" and body["lane"] == "sync"
    assert [len(p["0.5"]) for p in body["predictions"]] == [6, 6]


def test_a_waited_job_comes_back_with_its_announcement_and_its_waiter_reads_nothing(api, workers, monkeypatch):
    monkeypatch.setattr("api.service._RECHECK_S", 60.0)  # no re-read at an interval, however slow the machine
    store = api.app.state.service.store
    reads = []
    get = store.get
    monkeypatch.setattr(store, "get", lambda *args: reads.append(args) or get(*args))
    body = forecast_body(BOLT, n_series=2, length=44, horizon=5)

    predicted = api.post("/v1/predict", params={"timeout": 30}, json=body)
    reads_of_the_predict = list(reads)
    job = submit(api, forecast_body(BOLT, n_series=3, length=45, horizon=5))
    waited = api.get(f"/v1/forecasts/{job['id']}", params={"wait": 30}).json()

    assert predicted.status_code == 200 and reads_of_the_predict == []
    assert [len(p["0.5"]) for p in predicted.json()["predictions"]] == [5, 5]
    assert waited["status"] == "succeeded" and [len(p["mean"]) for p in waited["predictions"]] == [5, 5, 5]
    # The long-wait read the job once, found it not ended and marked it awaited; it read no more
    # unless the job ended before that read.
    assert 1 <= len(reads) - len(reads_of_the_predict) <= 2


def test_sync_predict_timeout_returns_the_job_id_and_the_job_still_succeeds(api, workers):
    slow = forecast_body(T5, n_series=4, horizon=30, num_samples=20)
    response = api.post("/v1/predict", params={"timeout": 0.05}, json=slow)
    assert response.status_code == 202
    job = response.json()
    assert job["status"] in ("queued", "running")
    assert response.headers["location"] == f"/v1/forecasts/{job['id']}"
    assert wait_for(api, job["id"])["status"] == "succeeded"


def test_sync_lane_is_served_before_a_bulk_backlog(workers, redis_server):
    from fastapi.testclient import TestClient

    from api.main import create_app

    # Each job sent at once (SEND_WINDOW_MS=0): how long the API holds a message (api/sender.py)
    # must not decide whether the backlog is queued before the sync request comes.
    settings = settings_for(redis_server, heartbeat_s=1, send_window_ms=0)
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as api:
        backlog = [submit(api, forecast_body(T5, n_series=2, horizon=20, num_samples=10)) for _ in range(4)]
        response = api.post("/v1/predict", params={"timeout": 60}, json=forecast_body(T5, horizon=4, num_samples=2))
        assert response.status_code == 200
        sync_finished = response.json()["finished_at"]
        finished = [wait_for(api, job["id"]) for job in backlog]
    # At most the job already running when the sync request arrived finishes before it.
    assert sum(job["finished_at"] < sync_finished for job in finished) <= 1


def test_cancelled_queued_job_never_runs(api, workers):
    blocker = submit(api, forecast_body(T5, n_series=3, horizon=30, num_samples=20))
    victim = submit(api, forecast_body(T5, n_series=1, horizon=4))

    response = api.delete(f"/v1/forecasts/{victim['id']}")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert wait_for(api, blocker["id"])["status"] == "succeeded"
    time.sleep(0.5)  # the victim's message has been consumed by now; it must have been dropped
    after = api.get(f"/v1/forecasts/{victim['id']}").json()
    assert after["status"] == "cancelled"
    assert after["attempts"] == 0 and after["started_at"] is None and after["predictions"] is None


def test_cancelling_a_running_job_stops_it_at_the_next_batch(api, workers):
    spec = catalog.get(T5)
    job = submit(api, forecast_body(T5, n_series=spec.max_batch_cpu * 8, length=30, horizon=10, num_samples=10))
    deadline = time.monotonic() + 60
    while api.get(f"/v1/forecasts/{job['id']}").json()["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)

    response = api.delete(f"/v1/forecasts/{job['id']}")

    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    done = wait_for(api, job["id"])
    assert done["status"] == "cancelled"
    assert done["predictions"] is None


def test_cancelling_a_finished_job_is_409(api, workers):
    job = submit(api, forecast_body(BOLT))
    assert wait_for(api, job["id"])["status"] == "succeeded"
    response = api.delete(f"/v1/forecasts/{job['id']}")
    assert response.status_code == 409
    assert response.json()["code"] == "job-finished"


def test_served_bolt_quantiles_equal_a_direct_predict_quantiles_call(api, workers, synthetic_dir):
    from chronos import BaseChronosPipeline

    body = forecast_body(BOLT, n_series=1, length=300, horizon=16, quantile_levels=[0.1, 0.3, 0.5, 0.9])
    served = wait_for(api, submit(api, body)["id"])["predictions"][0]

    pipeline = BaseChronosPipeline.from_pretrained(str(synthetic_dir / "chronos-bolt-tiny"), dtype=torch.float32)
    target = torch.tensor(body["inputs"][0]["target"], dtype=torch.float32)
    quantiles, mean = pipeline.predict_quantiles([target], prediction_length=16, quantile_levels=[0.1, 0.3, 0.5, 0.9])

    for j, level in enumerate(["0.1", "0.3", "0.5", "0.9"]):
        assert served[level] == quantiles[0, :, j].tolist()
    assert served["mean"] == mean[0].tolist()


def test_a_worker_never_takes_a_job_for_another_model(api, workers, redis_server):
    client = redis_server.client()
    other = catalog.get("amazon/chronos-bolt-mini")  # no worker serves it in this session
    depth = client.llen(keys.queue(other))
    orphan = submit(api, forecast_body(other.id))
    # Bodies no other test sends: an identical Bolt request would be answered from the result cache.
    served = [submit(api, forecast_body(model, length=59)) for model in (BOLT, T5)]

    finished = [wait_for(api, job["id"]) for job in served]

    assert [job["status"] for job in finished] == ["succeeded", "succeeded"]
    assert api.get(f"/v1/forecasts/{orphan['id']}").json()["status"] == "queued"
    assert client.llen(keys.queue(other)) == depth + 1
    api.delete(f"/v1/forecasts/{orphan['id']}")
    for job in finished:  # each job ran on a worker of its own model
        assert client.hget(keys.job(job["id"]), "worker").startswith(catalog.get(job["model"]).slug + "-")


def test_models_lists_the_whole_catalog_with_live_workers_and_queues(api, workers):
    response = api.get("/v1/models")
    assert response.status_code == 200
    # The catalog's entries (a key's fine-tuned models and the ensembles follow them).
    models = {m["id"]: m for m in response.json() if m["base_model"] is None and m["family"] != "ensemble"}
    assert set(models) == {spec.id for spec in catalog.CATALOG}
    bolt = models[BOLT]
    assert bolt["workers_online"] == 1 and bolt["weights"] == "synthetic"
    assert bolt["queue"] == "chronos-bolt-tiny" and bolt["sync_eligible"] is True
    assert bolt["context_length"] == 2048 and bolt["prediction_length"] == 64
    assert models[T5]["sync_eligible"] is True and models[T5]["context_length"] == 512
    assert models["amazon/chronos-t5-large"]["sync_eligible"] is False
    assert models["amazon/chronos-t5-large"]["workers_online"] == 0
    assert models["amazon/chronos-t5-large"]["weights"] is None
    assert api.get("/v1/models/chronos-bolt-tiny").json()["id"] == BOLT
    assert api.get("/v1/models/amazon/chronos-bolt-tiny").json()["slug"] == "chronos-bolt-tiny"


def test_many_concurrent_long_waits_all_wake(api, workers):
    jobs = [submit(api, forecast_body(BOLT, horizon=4)) for _ in range(20)]
    results: list[str] = []

    def waiter(job_id):
        results.append(api.get(f"/v1/forecasts/{job_id}", params={"wait": 30}).json()["status"])

    threads = [threading.Thread(target=waiter, args=(job["id"],)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["succeeded"] * 20


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").status_code == 200


def test_a_post_that_prefers_to_wait_answers_with_the_finished_job(api, workers):
    answer = api.post("/v1/forecasts", json=forecast_body(BOLT, n_series=2, length=41), headers={"Prefer": "wait=30"})

    assert answer.status_code == 200 and answer.headers["preference-applied"] == "wait=30"
    assert answer.json()["status"] == "succeeded" and len(answer.json()["predictions"]) == 2
    assert answer.headers["location"] == f"/v1/forecasts/{answer.json()['id']}"


def test_a_post_that_prefers_to_wait_for_a_job_that_does_not_end_in_time_is_202_as_usual(api):
    idle = "amazon/chronos-bolt-mini"  # no worker serves it here
    answer = api.post(
        "/v1/forecasts", json=forecast_body(idle, length=43), headers={"Prefer": "respond-async, wait=0.3"}
    )

    assert answer.status_code == 202 and answer.json()["status"] == "queued"
    api.delete(f"/v1/forecasts/{answer.json()['id']}")


def test_a_workers_heartbeat_says_how_busy_its_model_was(api, workers, redis_server):
    # The share of the last heartbeat period the model spent in passes: what the API reads to hold a
    # saturated model's messages longer (api/sender.py).
    client = redis_server.client()

    def busy() -> list[float]:
        return [json.loads(beat).get("busy", -1.0) for beat in client.hvals(keys.workers(catalog.get(BOLT)))]

    stop = threading.Event()

    def load() -> None:
        length = 3000
        while not stop.is_set():  # one job after another, each of 32 series of its own
            submitted = submit(api, forecast_body(BOLT, n_series=32, length=length, horizon=16))
            wait_for(api, submitted["id"])
            length += 1

    # Idle first (earlier tests' passes are a heartbeat behind), so that what is seen next is this load.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(b != 0 for b in busy()):
        time.sleep(0.1)
    assert busy() and all(b == 0 for b in busy()), busy()
    loader = threading.Thread(target=load)
    loader.start()
    seen: list[float] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and not any(0 < b <= 1 for b in seen):
            seen = busy()
            time.sleep(0.05)
    finally:
        stop.set()
        loader.join(60)
    assert any(0 < b <= 1 for b in seen), seen
    assert all(0 <= b <= 1 for b in seen), seen
