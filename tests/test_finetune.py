"""Fine-tuning jobs end to end: a training worker of synthetic Chronos-2 fine-tunes for a few
steps on CPU, the inference worker of the same base model serves the result to its owner only."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared import model_store
from shared.store import keys

from conftest import API_KEY, OTHER_KEY, settings_for, start_worker, wait_for

CHRONOS2 = "amazon/chronos-2"
PROBLEM = "application/problem+json"


def wave(n: int, k: int) -> list[float]:
    return [20 + 6 * math.sin(t / (2 + k)) + (t % (3 + k)) for t in range(n)]


def finetune_body(steps: int = 3, **parameters) -> dict:
    return {
        "model": CHRONOS2,
        "inputs": [{"item_id": f"s{k}", "target": wave(72, k)} for k in range(6)],
        "parameters": {"prediction_length": 4, "context_length": 32, "num_steps": steps, "batch_size": 4,
                       "learning_rate": 1e-3, **parameters},
    }  # fmt: skip


def forecast(api: TestClient, model: str, k: int = 1) -> list[float]:
    job = api.post("/v1/forecasts", json={"model": model, "inputs": [{"target": wave(48, k)}],
                                          "parameters": {"prediction_length": 4, "quantile_levels": [0.5]}})  # fmt: skip
    assert job.status_code == 202, job.text
    done = wait_for(api, job.json()["id"], timeout=120)
    assert done["status"] == "succeeded", done
    return done["predictions"][0]["0.5"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-store")


@pytest.fixture(scope="module")
def api(redis_server, store_dir):
    # No result cache: repeated forecasts must come from the model each time.
    settings = settings_for(redis_server, heartbeat_s=1, model_store=str(store_dir), cache_ttl_s=0,
                            max_finetune_steps=50)  # fmt: skip
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


@pytest.fixture(scope="module")
def server(redis_server, synthetic_dir, store_dir, tmp_path_factory):
    """The inference worker of the base model (it builds the synthetic checkpoint the trainer reuses)."""
    worker = start_worker(redis_server, synthetic_dir, CHRONOS2, tmp_path_factory.mktemp("serve"),
                          MODEL_STORE=str(store_dir))  # fmt: skip
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def trainer(redis_server, synthetic_dir, store_dir, server, tmp_path_factory):
    worker = start_worker(redis_server, synthetic_dir, CHRONOS2, tmp_path_factory.mktemp("train"),
                          MODEL_STORE=str(store_dir), TRAIN="true")  # fmt: skip
    yield worker
    worker.stop()


def test_a_lora_finetune_reports_each_step_and_serves_its_owner_only(api, server, trainer, store_dir):
    answer = api.post("/v1/finetunes", json=finetune_body(steps=3))
    assert answer.status_code == 202, answer.text
    assert answer.headers["Location"] == f"/v1/finetunes/{answer.json()['id']}"

    done = wait_for(api, answer.json()["id"], timeout=300)

    assert done["status"] == "succeeded", done
    assert done["kind"] == "finetune" and done["progress"] == {"done": 3, "total": 3}
    record = done["finetune"]
    assert record["mode"] == "lora" and len(record["losses"]) == 3 and all(math.isfinite(x) for x in record["losses"])
    for model in ("base", "finetuned"):
        assert record["metrics"][model]["wql"] > 0 and record["metrics"][model]["mase"] > 0
    name = done["finetuned_model"]
    assert name == f"{CHRONOS2}:ft-{done['id'][:12]}" and record["finetuned_model"] == name
    assert (model_store.path(store_dir, name) / model_store.MANIFEST).exists()
    assert not list(store_dir.glob(".staging-*"))  # nothing half-written left behind

    listed = {m["id"]: m for m in api.get("/v1/models").json()}
    assert listed[name]["base_model"] == CHRONOS2 and listed[name]["finetune"]["mode"] == "lora"
    other = {"X-API-Key": OTHER_KEY}
    assert name not in {m["id"] for m in api.get("/v1/models", headers=other).json()}
    assert api.get(f"/v1/models/{name}", headers=other).status_code == 404
    refused = api.post("/v1/forecasts", headers=other, json={"model": name, "inputs": [{"target": wave(48, 1)}],
                                                             "parameters": {"prediction_length": 4}})  # fmt: skip
    assert refused.status_code == 404 and refused.json()["code"] == "unknown-model"

    # One inference worker serves the base model and the fine-tuned one in turn, each reproducibly.
    tuned, base, tuned_again, base_again = (forecast(api, m) for m in (name, CHRONOS2, name, CHRONOS2))
    assert tuned == tuned_again and base == base_again
    assert tuned != pytest.approx(base, rel=1e-4)
    # Backtests (and anomaly jobs) take it as well: the same variant runs each window.
    backtest = api.post("/v1/backtests", json={"model": name, "series": {"target": wave(60, 1)},
                                               "origins": {"first": 48, "last": 48}, "context_length": 48,
                                               "parameters": {"prediction_length": 4, "quantile_levels": [0.5]}})  # fmt: skip
    assert backtest.status_code == 202, backtest.text
    scored = wait_for(api, backtest.json()["id"], timeout=120)
    assert scored["status"] == "succeeded" and scored["model"] == name
    assert scored["backtest"]["forecasts"][0]["0.5"] == pytest.approx(tuned, rel=1e-5)  # the same 48 points

    assert api.delete(f"/v1/models/{name}", headers=other).status_code == 404
    assert api.delete(f"/v1/models/{name}").status_code == 204
    assert name not in {m["id"] for m in api.get("/v1/models").json()}
    gone = api.post("/v1/forecasts", json={"model": name, "inputs": [{"target": wave(48, 1)}],
                                           "parameters": {"prediction_length": 4}})  # fmt: skip
    assert gone.status_code == 404 and not model_store.path(store_dir, name).exists()


def test_a_running_finetune_is_cancelled_between_steps(api, trainer, redis_server, store_dir):
    job = api.post("/v1/finetunes", json=finetune_body(steps=40)).json()
    deadline = time.monotonic() + 120
    while api.get(f"/v1/finetunes/{job['id']}").json()["progress"]["done"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)

    assert api.delete(f"/v1/finetunes/{job['id']}").status_code == 202
    done = wait_for(api, job["id"], timeout=120)

    assert done["status"] == "cancelled" and 1 <= done["progress"]["done"] < 40
    assert done["finetuned_model"] is None and len(done["finetune"]["losses"]) >= 1
    assert not redis_server.client().hexists(keys.FINETUNED, f"{CHRONOS2}:ft-{job['id'][:12]}")
    assert not list(store_dir.glob(".staging-*")) and not list(store_dir.glob(f"*{job['id'][:12]}*"))


@pytest.mark.parametrize(
    ("change", "field", "status", "code"),
    [
        ({"model": "amazon/chronos-bolt-tiny"}, "model", 422, "unsupported-input"),
        ({"model": "amazon/chronos-9"}, "model", 404, "unknown-model"),
        ({"parameters": {"prediction_length": 30}}, "inputs[0].target", 422, "validation-error"),
        ({"parameters": {"num_steps": 51}}, "parameters.num_steps", 422, "limit-exceeded"),
        ({"parameters": {"finetune_mode": "half"}}, "parameters.finetune_mode", 422, "validation-error"),
        ({"inputs": [{"target": wave(72, 1), "past_covariates": {"x": wave(72, 2)},
                      "future_covariates": {"x": wave(4, 2)}}]}, "inputs[0].future_covariates", 422,
         "validation-error"),
    ],
    ids=["not-tunable", "unknown-model", "too-short", "too-many-steps", "unknown-mode", "future-covariates"],
)  # fmt: skip
def test_bad_finetunes_name_the_field_and_queue_nothing(api, redis_server, change, field, status, code):
    client = redis_server.client()
    before = set(client.scan_iter("cq:job:*"))
    body = finetune_body()
    body["parameters"] |= change.pop("parameters", {})
    body |= change

    answer = api.post("/v1/finetunes", json=body)

    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM
    assert answer.json()["field"] == field and answer.json()["code"] == code, answer.json()
    assert set(client.scan_iter("cq:job:*")) == before


def test_the_client_fine_tunes_forecasts_with_the_result_and_deletes_it(live_api, server, trainer):
    from client import Client, NotFound

    data = [{"item_id": f"c{k}", "target": wave(60, k)} for k in range(4)]
    with Client(live_api, api_key=API_KEY) as cq:
        done = cq.wait(cq.submit_finetune(CHRONOS2, data, 4, num_steps=2, batch_size=4, context_length=32,
                                          validation=False).id, timeout=300)  # fmt: skip
        name = done.finetuned_model
        served = cq.wait(cq.submit(name, [wave(48, 1)], 4).id, timeout=120)
        listed = [m.id for m in cq.models()]
        cq.delete_model(name)
        with pytest.raises(NotFound):
            cq.submit(name, [wave(48, 1)], 4)

    assert done.status.value == "succeeded" and "metrics" not in done.finetune  # no validation asked for
    assert served.status.value == "succeeded" and served.model == name and len(served.predictions[0]["0.5"]) == 4
    assert name in listed


# Last: it kills the module's training worker.
def test_a_training_worker_killed_mid_run_is_replaced_and_the_job_ends(
    api, trainer, redis_server, synthetic_dir, store_dir, tmp_path_factory
):
    job = api.post("/v1/finetunes", json=finetune_body(steps=6)).json()
    deadline = time.monotonic() + 120
    while api.get(f"/v1/finetunes/{job['id']}").json()["progress"]["done"] < 2 and time.monotonic() < deadline:
        time.sleep(0.1)

    os.killpg(trainer.process.pid, signal.SIGKILL)
    trainer.process.wait(10)
    replacement = start_worker(redis_server, synthetic_dir, CHRONOS2, tmp_path_factory.mktemp("train2"),
                               MODEL_STORE=str(store_dir), TRAIN="true")  # fmt: skip
    try:
        done = wait_for(api, job["id"], timeout=300)
    finally:
        replacement.stop()

    # Given back by the reaper and trained again from the start: it ends, never stuck running.
    assert done["status"] == "succeeded", (done, replacement.tail())
    assert done["attempts"] == 2 and done["progress"] == {"done": 6, "total": 6}
    assert (model_store.path(store_dir, done["finetuned_model"]) / model_store.MANIFEST).exists()
    assert not list(store_dir.glob(".staging-*"))
    assert api.delete(f"/v1/models/{done['finetuned_model']}").status_code == 204  # the session's Redis is shared
