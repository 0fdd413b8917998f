"""Chronos-2: covariates, several target variates, its native horizon, on a real worker and in-process."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared import catalog
from shared.series import Decoded
from workers.runtime import ModelRuntime
from workers.weights import resolve

from conftest import API_KEY, settings_for, start_worker, wait_for

CHRONOS2 = "amazon/chronos-2"
PROBLEM = "application/problem+json"


def stored_series(series: dict) -> Decoded:
    """A request's series as a worker reads it back from Redis."""
    return Decoded.of(series["target"], series.get("past_covariates"), series.get("future_covariates"))


def wave(n: int, k: int = 1) -> list[float]:
    return [10 + math.sin(t / (3 + k)) * 4 + (t % 7) for t in range(n)]


def covariate_series(n: int = 96, horizon: int = 12) -> dict:
    return {
        "item_id": "store-1",
        "target": wave(n),
        "past_covariates": {"price": wave(n, 2), "promo": (["yes", "no", None] * n)[:n]},
        "future_covariates": {"price": wave(horizon, 2), "promo": ["no"] * horizon},
    }


def body(*inputs: dict, horizon: int = 12, **params) -> dict:
    return {
        "model": CHRONOS2,
        "inputs": list(inputs),
        "parameters": {"prediction_length": horizon, "quantile_levels": [0.1, 0.5, 0.9], **params},
    }


@pytest.fixture(scope="module")
def chronos2_worker(redis_server, synthetic_dir, tmp_path_factory):
    worker = start_worker(redis_server, synthetic_dir, CHRONOS2, tmp_path_factory.mktemp("c2logs"))
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def runtime(redis_server, synthetic_dir) -> ModelRuntime:
    """The same checkpoint the worker serves, loaded in this process through the worker's code."""
    settings = settings_for(redis_server, weights="synthetic", synthetic_dir=str(synthetic_dir), max_batch=4)
    spec = catalog.get(CHRONOS2)
    return ModelRuntime(spec, resolve(spec, settings), settings)


def test_a_job_with_past_and_future_covariates_is_what_the_pipeline_gives_directly(api, chronos2_worker, runtime):
    series = covariate_series()
    job = api.post("/v1/forecasts", json=body(series)).json()

    done = wait_for(api, job["id"])

    assert done["status"] == "succeeded", done
    (served,) = done["predictions"]
    assert served["item_id"] == "store-1" and set(served) == {"item_id", "mean", "0.1", "0.5", "0.9"}
    assert all(len(served[k]) == 12 for k in ("mean", "0.1", "0.5", "0.9"))
    quantiles, mean = runtime.pipeline.predict_quantiles(
        [{"target": np.array(series["target"], dtype=np.float32),
          "past_covariates": {"price": np.array(series["past_covariates"]["price"], dtype=np.float32),
                              "promo": np.array(series["past_covariates"]["promo"], dtype=object)},
          "future_covariates": {"price": np.array(series["future_covariates"]["price"], dtype=np.float32),
                                "promo": np.array(series["future_covariates"]["promo"], dtype=object)}}],
        prediction_length=12, quantile_levels=[0.1, 0.5, 0.9],
    )  # fmt: skip
    for j, level in enumerate(("0.1", "0.5", "0.9")):
        assert served[level] == pytest.approx(quantiles[0][0, :, j].tolist(), rel=1e-5)
    assert served["mean"] == served["0.5"]  # Chronos-2's point forecast is its median
    assert done["weights"] == "synthetic"


def test_several_target_variates_are_forecast_jointly_one_list_per_variate(api, chronos2_worker):
    series = {"target": [wave(80, 1), wave(80, 2), wave(80, 3)]}
    job = api.post("/v1/forecasts", json=body(series, horizon=5)).json()

    (served,) = wait_for(api, job["id"])["predictions"]

    assert len(served["0.5"]) == 3 and all(len(v) == 5 for v in served["0.5"])
    assert len(served["mean"]) == 3


def test_the_native_horizon_of_1024_steps_is_served(api, chronos2_worker):
    job = api.post("/v1/forecasts", json=body({"target": wave(200)}, horizon=1024)).json()

    done = wait_for(api, job["id"], timeout=120)

    assert done["status"] == "succeeded", done
    assert len(done["predictions"][0]["0.9"]) == 1024


def test_series_of_different_schemas_share_a_pass_and_each_gets_its_own_forecast(runtime):
    plain = {"target": wave(64)}
    covariates = covariate_series(64, 6)
    two = {"target": [wave(64, 1), wave(64, 2)]}
    # A categorical covariate whose past values are all missing takes its kind from its future values.
    unseen_past = {"target": wave(64), "past_covariates": {"c": [None] * 64}, "future_covariates": {"c": ["a"] * 6}}

    stored = [stored_series(s) for s in (plain, covariates, two, unseen_past)]

    mixed = runtime.predict(stored, 6, [0.5])
    alone = [runtime.predict([s], 6, [0.5])[0] for s in stored]

    for together, single in zip(mixed, alone, strict=True):  # [variates, mean and 0.5, steps]
        assert np.allclose(together[:, 1], single[:, 1], rtol=1e-5)
    assert mixed[2][:, 1].shape == (2, 6)


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        (
            lambda s: s["future_covariates"].update(price=wave(5)),
            "inputs[0].future_covariates.price",
            "validation-error",
        ),
        (lambda s: s["past_covariates"].update(price=wave(10)), "inputs[0].past_covariates.price", "validation-error"),
        (
            lambda s: s["future_covariates"].update(temp=wave(12)),
            "inputs[0].future_covariates.temp",
            "validation-error",
        ),
        (
            lambda s: s["future_covariates"].update(promo=[1.0] * 12),
            "inputs[0].future_covariates.promo",
            "validation-error",
        ),
    ],
    ids=["future-length", "past-length", "future-without-past", "kind-mismatch"],
)
def test_covariate_mismatches_are_422_naming_the_field_and_change_nothing(api, redis_server, change, field, code):
    series = covariate_series()
    change(series)
    client = redis_server.client()
    before = set(client.scan_iter("cq:job:*"))

    answer = api.post("/v1/forecasts", json=body(series))

    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == PROBLEM
    assert answer.json()["code"] == code and answer.json()["field"] == field
    assert set(client.scan_iter("cq:job:*")) == before


@pytest.mark.parametrize(
    ("series", "field"),
    [
        ({"target": wave(20), "past_covariates": {"x": wave(20)}}, "inputs[0].past_covariates"),
        ({"target": [wave(20), wave(20)]}, "inputs[0].target"),
    ],
    ids=["covariates", "several-variates"],
)
def test_covariates_and_variates_on_a_model_without_them_are_422(api, series, field):
    answer = api.post(
        "/v1/forecasts",
        json={"model": "amazon/chronos-bolt-tiny", "inputs": [series], "parameters": {"prediction_length": 3}},
    )

    assert answer.status_code == 422
    assert answer.json()["code"] == "unsupported-input" and answer.json()["field"] == field


def test_target_variates_of_different_lengths_are_422(api):
    answer = api.post("/v1/forecasts", json=body({"target": [wave(20), wave(19)]}))

    assert answer.status_code == 422 and answer.json()["field"] == "inputs[0].target"


def test_the_catalog_lists_chronos2_with_its_21_quantiles(api):
    view = api.get("/v1/models/chronos-2", headers={"X-API-Key": API_KEY}).json()

    assert view["prediction_length"] == 1024 and view["context_length"] == 8192
    assert len(view["native_quantiles"]) == 21 and view["sample_based"] is False


def _direct(runtime: ModelRuntime, targets: list[list[float]], horizon: int, cross_learning: bool) -> list:
    """Each series' [0.1, 0.5, 0.9] x steps from one direct pipeline call over all of them."""
    quantiles, _ = runtime.pipeline.predict_quantiles(
        [np.array(t, dtype=np.float32) for t in targets], prediction_length=horizon,
        quantile_levels=[0.1, 0.5, 0.9], cross_learning=cross_learning,
    )  # fmt: skip
    return [q[0].T.tolist() for q in quantiles]


def test_cross_learning_forecasts_a_jobs_series_as_one_group_and_never_with_another_jobs(
    api, chronos2_worker, runtime
):
    first = [wave(64, k) for k in range(1, 6)]
    second = [[x * 3 + 50 for x in wave(80, k)] for k in range(2, 5)]
    # Sent back to back, so the second waits while the first runs: they would share a pass if they could.
    jobs = [api.post("/v1/forecasts", json=body(*({"target": t} for t in targets), horizon=6, cross_learning=True))
            for targets in (first, second)]  # fmt: skip

    served = [wait_for(api, job.json()["id"])["predictions"] for job in jobs]

    for targets, predictions in zip((first, second), served, strict=True):
        joint = _direct(runtime, targets, 6, cross_learning=True)
        for forecast, expected in zip(predictions, joint, strict=True):
            for j, level in enumerate(("0.1", "0.5", "0.9")):
                assert forecast[level] == pytest.approx(expected[j], rel=1e-4, abs=1e-4)
    # The flag reaches the model: each series alone forecasts otherwise.
    independent = _direct(runtime, first, 6, cross_learning=False)
    assert any(
        not np.allclose(f["0.5"], alone[1], rtol=1e-4, atol=1e-4)
        for f, alone in zip(served[0], independent, strict=True)
    )


@pytest.mark.parametrize(
    ("request_body", "field", "code"),
    [
        ({"model": "amazon/chronos-bolt-tiny", "inputs": [{"target": wave(20)}],
          "parameters": {"prediction_length": 3, "cross_learning": True}}, "parameters.cross_learning",
         "unsupported-input"),
        (body({"target": wave(20)}, {"target": wave(20)}, {"target": wave(20)}, cross_learning=True), "inputs",
         "limit-exceeded"),
        (body({"target": wave(20)}, {"target": [wave(20), wave(20)]}, cross_learning=True), "inputs[1]",
         "validation-error"),
    ],
    ids=["bolt", "over-the-cap", "two-schemas"],
)  # fmt: skip
def test_cross_learning_beyond_what_it_can_do_is_422(redis_server, request_body, field, code):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(
        create_app(settings_for(redis_server, cross_learning_max_series=2)), headers={"X-API-Key": API_KEY}
    ) as client:
        answer = client.post("/v1/forecasts", json=request_body)

    assert answer.status_code == 422 and answer.headers["content-type"] == PROBLEM
    assert answer.json()["field"] == field and answer.json()["code"] == code, answer.json()
    if code == "limit-exceeded":
        assert "CROSS_LEARNING_MAX_SERIES" in answer.json()["detail"]
