"""Anomaly jobs: the windows and the interval logic, then the route end to end on a real worker,
checked against the same checkpoint called directly."""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared import catalog
from shared.series import Decoded
from workers import anomaly
from workers.runtime import ModelRuntime
from workers.weights import resolve

from conftest import API_KEY, BOLT, OTHER_KEY, T5, settings_for, wait_for

PROBLEM = "application/problem+json"
SPIKES = (50, 61, 73)


def readings(n: int, spikes: tuple[int, ...] = ()) -> list[float]:
    """A smooth daily load with planted spikes far outside anything its past suggests."""
    values = [20 + 3 * math.sin(t / 4) + 0.5 * (t % 3) for t in range(n)]
    for t in spikes:
        values[t] = 1e5
    return values


def body(*inputs: dict, model: str = BOLT, **parameters) -> dict:
    return {"model": model, "inputs": list(inputs), "parameters": {"level": 0.8, "context_length": 32, **parameters}}


def test_each_window_sees_only_the_points_before_its_origin():
    target = np.arange(10, dtype=np.float32)

    one_step = anomaly.windows([target], [6], context=3, horizon=1)
    strided = anomaly.windows([target, target[:5]], [6, 2], context=4, horizon=3)

    assert [w.target.tolist() for w in one_step] == [[[3, 4, 5]], [[4, 5, 6]], [[5, 6, 7]], [[6, 7, 8]]]
    # Origins 6 and 9 of the first series (3 steps each), then 2 of the second: every scored point once.
    assert [w.target.tolist() for w in strided] == [[[2, 3, 4, 5]], [[5, 6, 7, 8]], [[0, 1]]]
    assert np.shares_memory(one_step[0].target, target)  # views: an anomaly job copies no window


def test_a_point_outside_the_interval_scores_its_distance_in_interval_widths():
    target = np.array([0, 0, 15.0, 5.0, -4.0, np.nan, 10.0], dtype=np.float32)
    # Every forecast: mean 1, lower 0, median 5, upper 10 (rows as a pass returns them), horizon 2.
    forecast = np.array([[[1, 1], [0, 0], [5, 5], [10, 10]]], dtype=np.float32)

    (result,) = anomaly.score([target], [2], 2, [forecast] * 3, rows=[1, 3, 2])

    lower, upper, median, score = result
    assert lower.tolist() == [0] * 5 and upper.tolist() == [10] * 5 and median.tolist() == [5] * 5
    assert score[:3].tolist() == pytest.approx([0.5, 0.0, 0.4]) and math.isnan(score[3]) and score[4] == 0.0  # 10 is inside


@pytest.fixture(scope="module")
def bolt(redis_server, synthetic_dir) -> ModelRuntime:
    """The checkpoint the Bolt worker serves, loaded in this process through the worker's code."""
    settings = settings_for(redis_server, weights="synthetic", synthetic_dir=str(synthetic_dir))
    spec = catalog.get(BOLT)
    return ModelRuntime(spec, resolve(spec, settings), settings)


def test_planted_spikes_are_flagged_with_the_pipelines_own_interval(api, workers, bolt):
    series = {"item_id": "meter-7", "target": readings(90, SPIKES)}
    answer = api.post("/v1/anomalies", json=body(series, {"target": readings(40)}))
    assert answer.status_code == 202, answer.text
    assert answer.headers["Location"] == f"/v1/anomalies/{answer.json()['id']}"

    done = wait_for(api, answer.json()["id"])

    assert done["status"] == "succeeded", done
    assert done["kind"] == "anomaly" and done["progress"] == {"done": 58 + 8, "total": 58 + 8}
    first, second = done["anomalies"]
    assert first["item_id"] == "meter-7" and first["start"] == 32 and second["start"] == 32
    assert all(len(first[k]) == 58 for k in ("lower", "upper", "median", "anomaly", "score"))
    flagged = {first["start"] + i for i, flag in enumerate(first["anomaly"]) if flag}
    assert set(SPIKES) <= flagged
    # The interval is the model's own: each point's 0.1 and 0.9 quantiles, forecast from the 32 before it.
    target = np.array(series["target"], dtype=np.float32)
    windows = [Decoded(target[None, t - 32 : t]) for t in range(32, 90)]
    direct = bolt.predict(windows, 1, [0.1, 0.5, 0.9])
    assert first["lower"] == pytest.approx([d[0, 1, 0] for d in direct], rel=1e-5, abs=1e-5)
    assert first["median"] == pytest.approx([d[0, 2, 0] for d in direct], rel=1e-5, abs=1e-5)
    assert first["upper"] == pytest.approx([d[0, 3, 0] for d in direct], rel=1e-5, abs=1e-5)
    # Flags and scores follow from the interval: 0 inside, distance / width outside.
    actual = target[32:].astype(np.float64)
    lower, upper = np.array(first["lower"]), np.array(first["upper"])
    assert first["anomaly"] == ((actual < lower) | (actual > upper)).tolist()
    expected = np.maximum(np.maximum(actual - upper, lower - actual), 0) / (upper - lower)
    assert first["score"] == pytest.approx(expected.tolist(), rel=1e-4)


def test_scoring_only_the_last_points_is_the_same_call(api, workers):
    series = {"target": readings(90, SPIKES)}
    full = wait_for(api, api.post("/v1/anomalies", json=body(series)).json()["id"])["anomalies"][0]

    online = api.post("/v1/anomalies", json=body(series, score_from=85)).json()
    (last,) = wait_for(api, online["id"])["anomalies"]

    assert last["start"] == 85 and len(last["score"]) == 5
    for key in ("lower", "upper", "score"):
        assert last[key] == pytest.approx(full[key][85 - 32 :], rel=1e-5)


def test_a_horizon_scores_each_point_once_from_origins_that_far_apart(api, workers):
    job = api.post("/v1/anomalies", json=body({"target": readings(60)}, horizon=8)).json()

    done = wait_for(api, job["id"])

    assert done["progress"]["total"] == 4  # origins 32, 40, 48, 56 cover points 32..59
    assert len(done["anomalies"][0]["score"]) == 28


def test_the_results_come_as_a_table_too(api, workers):
    job = api.post("/v1/anomalies", json=body({"item_id": "a", "target": readings(40, (35,))})).json()
    wait_for(api, job["id"])

    answer = api.get(f"/v1/anomalies/{job['id']}", headers={"Accept": "application/vnd.apache.arrow.stream"})

    table = pa.ipc.open_stream(io.BytesIO(answer.content)).read_all().to_pydict()
    assert table["index"] == list(range(32, 40)) and set(table["item_id"]) == {"a"}
    assert table["anomaly"][35 - 32] is True
    assert set(table) == {"item_id", "index", "lower", "upper", "median", "anomaly", "score"}


def test_a_t5_job_reports_progress_and_takes_any_level(api, workers):
    job = api.post("/v1/anomalies", json=body({"target": readings(300)}, model=T5, level=0.99, seed=3)).json()
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        view = api.get(f"/v1/anomalies/{job['id']}").json()
        seen.add(view["progress"]["done"])
        if view["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)

    assert view["status"] == "succeeded", view
    assert view["progress"] == {"done": 268, "total": 268}
    assert any(0 < done < 268 for done in seen), seen
    assert len(view["anomalies"][0]["score"]) == 268


def test_the_event_stream_shows_progress_and_ends_with_the_anomalies(api, workers):
    job = api.post("/v1/anomalies", json=body({"target": readings(200)}, model=T5, seed=1)).json()
    seen = []
    with api.stream("GET", f"/v1/anomalies/{job['id']}/events", timeout=120) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line.removeprefix("data: ")))

    progress = [data["progress"]["done"] for data in seen]
    assert progress == sorted(progress) and progress[-1] == 168 and any(0 < done < 168 for done in progress)
    assert all(data.get("anomalies") is None for data in seen[:-1])  # updates stay small
    assert seen[-1]["status"] == "succeeded" and len(seen[-1]["anomalies"][0]["score"]) == 168


def test_a_running_job_is_cancelled_between_passes(api, workers):
    job = api.post("/v1/anomalies", json=body({"target": readings(1000)}, model=T5, seed=2)).json()
    deadline = time.monotonic() + 60
    while api.get(f"/v1/anomalies/{job['id']}").json()["progress"]["done"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)

    answer = api.delete(f"/v1/anomalies/{job['id']}")

    assert answer.status_code == 202, answer.text
    done = wait_for(api, job["id"])
    assert done["status"] == "cancelled" and done["progress"]["done"] < done["progress"]["total"]
    assert done["anomalies"] is None


def test_another_key_cannot_see_or_cancel_the_job(api, workers):
    job = api.post("/v1/anomalies", json=body({"target": readings(40)})).json()

    for method in ("GET", "DELETE"):
        answer = api.request(method, f"/v1/anomalies/{job['id']}", headers={"X-API-Key": OTHER_KEY})
        assert answer.status_code == 404 and answer.headers["content-type"] == PROBLEM
    assert wait_for(api, job["id"])["status"] == "succeeded"


def test_an_identical_request_is_answered_from_the_cache(api, workers):
    series = {"target": readings(48, (40,))}
    first = wait_for(api, api.post("/v1/anomalies", json=body(series)).json()["id"])

    again = api.post("/v1/anomalies", json=body(series)).json()

    assert again["cached"] is True and again["status"] == "succeeded"
    assert again["anomalies"] == first["anomalies"]


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        ({"parameters": {"level": 0.9}}, "parameters.level", "unsupported-input"),
        ({"parameters": {"level": 1.0}}, "parameters.level", "validation-error"),
        ({"parameters": {"score_from": 40}}, "inputs[0].target", "validation-error"),
        ({"inputs": [{"target": [1.0]}]}, "inputs[0].target", "validation-error"),
        ({"parameters": {"num_samples": 50}}, "parameters.num_samples", "not-sample-based"),
        ({"model": "amazon/chronos-2", "inputs": [{"target": [readings(40)] * 2}]}, "inputs[0].target",
         "unsupported-input"),
        ({"model": "amazon/chronos-2", "inputs": [{"target": readings(40), "past_covariates": {"x": readings(40)}}]},
         "inputs[0].past_covariates", "unsupported-input"),
    ],
    ids=["level-beyond-bolt", "level-one", "nothing-to-score", "one-point", "samples-on-bolt", "variates",
         "covariates"],
)  # fmt: skip
def test_bad_anomaly_jobs_are_422_naming_the_field_and_queue_nothing(api, redis_server, change, field, code):
    client = redis_server.client()
    before = set(client.scan_iter("cq:job:*"))
    request = body({"target": readings(40)})
    request["parameters"] |= change.pop("parameters", {})
    request |= change

    answer = api.post("/v1/anomalies", json=request)

    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == PROBLEM
    assert answer.json()["field"] == field and answer.json()["code"] == code, answer.json()
    assert set(client.scan_iter("cq:job:*")) == before


def test_the_level_error_names_the_widest_interval_the_model_gives(api):
    answer = api.post("/v1/anomalies", json=body({"target": readings(40)}, level=0.99)).json()

    assert "at most 0.8" in answer["detail"] and "0.005" in answer["detail"]


def test_too_many_forecasts_is_limit_exceeded(redis_server):
    settings = settings_for(redis_server, max_anomaly_windows=10)
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as api:
        answer = api.post("/v1/anomalies", json=body({"target": readings(40)}, {"target": readings(40)}))

    assert answer.status_code == 422 and answer.json()["code"] == "limit-exceeded"
    assert answer.json()["field"] == "inputs" and "MAX_ANOMALY_WINDOWS" in answer.json()["detail"]
