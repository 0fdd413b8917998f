"""Backtests as one job: windows, scores, progress, and the route end to end on a real worker."""

from __future__ import annotations

import math
import time

import pytest

from shared.schemas import BacktestRequest
from workers import backtest

from conftest import BOLT, T5, wait_for

PROBLEM = "application/problem+json"


def prices(n: int) -> list[float]:
    return [100 + 5 * math.sin(t / 6) + (t % 5) for t in range(n)]


def request(**overrides) -> dict:
    return {
        "model": BOLT,
        "series": {"item_id": "SPY", "target": prices(300)},
        "origins": {"first": 252, "last": 300, "step": 1},
        "context_length": 252,
        "parameters": {"prediction_length": 5, "quantile_levels": [0.1, 0.5, 0.9]},
        **overrides,
    }


def test_each_origin_sees_only_the_context_before_it_and_known_covariates_after_it():
    req = BacktestRequest.model_validate(
        request(
            model="amazon/chronos-2",
            series={"target": prices(30), "past_covariates": {"price": list(range(30)), "noise": [0.0] * 30}},
            origins={"first": 10, "last": 28, "step": 9},
            context_length=4,
            known_covariates=["price"],
        )
    )

    windows = backtest.windows(req, context_length=8192)

    assert [w["target"] for w in windows] == [prices(30)[6:10], prices(30)[15:19], prices(30)[24:28]]
    assert windows[0]["past_covariates"] == {"price": [6, 7, 8, 9], "noise": [0.0] * 4}
    # The horizon runs past the series' end at origin 28: unknown future values are missing, not invented.
    assert windows[2]["future_covariates"] == {"price": [28, 29, None, None, None]}


def test_a_perfect_forecast_scores_zero_with_full_coverage_and_an_offset_one_scores_its_error():
    target = [float(t % 4) for t in range(40)]  # 19 naive one-step errors before origin 20: 1, 1, 1, 3, …
    body = request(series={"target": target}, origins={"first": 20, "last": 36, "step": 4},
                   parameters={"prediction_length": 4, "quantile_levels": [0.1, 0.9]})  # fmt: skip
    req = BacktestRequest.model_validate(body)
    perfect = [{str(q): target[o : o + 4] for q in (0.1, 0.5, 0.9)} for o in req.origins.values()]
    above = [{str(q): [x + 1.0 for x in target[o : o + 4]] for q in (0.1, 0.5, 0.9)} for o in req.origins.values()]

    best = backtest.score(req, perfect)["metrics"]
    off = backtest.score(req, above)["metrics"]

    assert best["mase"] == 0 and best["wql"] == 0 and best["coverage"] == {"0.8": 1.0}
    assert best["points_scored"] == 5 * 4 and best["origins_scored"] == 5
    assert off["mae"] == 1.0 and off["mase"] == pytest.approx(1 / (27 / 19)) and off["coverage"] == {"0.8": 0.0}
    # Every actual lies 1 below each quantile: the pinball loss per point is (1 - q).
    scored = sum(target[20:40])
    assert off["wql"] == pytest.approx(2 * sum((1 - q) * 20 for q in (0.1, 0.9)) / (2 * scored))
    # A pure season has no seasonal-naive error to scale by: MASE is null, not infinite.
    seasonal = BacktestRequest.model_validate({**body, "season_length": 4})
    assert backtest.score(seasonal, above)["metrics"]["mase"] is None


def test_mase_is_scaled_by_the_naive_error_before_the_first_origin():
    target = [float(t) for t in range(30)]  # naive one-step error 1 everywhere
    req = BacktestRequest.model_validate(
        request(series={"target": target}, origins={"first": 20, "last": 20},
                parameters={"prediction_length": 3, "quantile_levels": [0.5]})
    )  # fmt: skip

    metrics = backtest.score(req, [{"0.5": [22.0, 23.0, 24.0]}])["metrics"]

    assert metrics["mae"] == 2.0 and metrics["mase"] == 2.0


def test_a_backtest_runs_every_origin_as_one_job_and_matches_single_forecasts(api, workers):
    answer = api.post("/v1/backtests", json=request())
    assert answer.status_code == 202, answer.text
    assert answer.headers["Location"] == f"/v1/backtests/{answer.json()['id']}"

    done = api.get(f"/v1/backtests/{answer.json()['id']}", params={"wait": 30}).json()

    assert done["status"] == "succeeded", done
    assert done["kind"] == "backtest" and done["progress"] == {"done": 49, "total": 49}
    result = done["backtest"]
    assert [f["origin"] for f in result["forecasts"]] == list(range(252, 301))
    assert set(result["forecasts"][0]) == {"origin", "0.1", "0.5", "0.9"}
    metrics = result["metrics"]
    assert metrics["origins_scored"] == 48  # origin 300: all 300 points known, no actual left to score
    assert metrics["points_scored"] == sum(min(5, 300 - o) for o in range(252, 300))
    assert metrics["mase"] > 0 and metrics["wql"] > 0 and 0 <= metrics["coverage"]["0.8"] <= 1
    # The forecast from origin 260 is the forecast of the 252 points before it.
    single = api.post("/v1/forecasts", json={"model": BOLT, "inputs": [{"target": prices(300)[8:260]}],
                                             "parameters": {"prediction_length": 5, "quantile_levels": [0.1, 0.5, 0.9]}})  # fmt: skip
    (alone,) = wait_for(api, single.json()["id"])["predictions"]
    at_260 = result["forecasts"][8]
    assert at_260["origin"] == 260
    for level in ("0.1", "0.5", "0.9"):
        assert at_260[level] == pytest.approx(alone[level], rel=1e-5)


def test_progress_is_visible_while_a_backtest_runs(api, workers):
    body = request(model=T5, origins={"first": 64, "last": 299, "step": 2}, context_length=64,
                   parameters={"prediction_length": 8, "quantile_levels": [0.5]})  # fmt: skip
    job = api.post("/v1/backtests", json=body).json()
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        view = api.get(f"/v1/backtests/{job['id']}").json()
        seen.add(view["progress"]["done"])
        if view["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)

    assert view["status"] == "succeeded", view
    total = len(range(64, 300, 2))
    assert view["progress"] == {"done": total, "total": total}
    assert any(0 < done < total for done in seen), seen


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"origins": {"first": 252, "last": 301}}, "origins.last"),
        ({"origins": {"first": 260, "last": 255}}, "origins.last"),
        ({"origins": {"first": 0, "last": 10}}, "origins.first"),
        ({"known_covariates": ["price"]}, "known_covariates[0]"),
        ({"series": {"target": [prices(300), prices(300)]}}, "series.target"),
        ({"series": {"target": prices(300), "past_covariates": {"x": prices(300)}}}, "series.past_covariates"),
    ],
    ids=[
        "last-past-the-end",
        "last-before-first",
        "origin-zero",
        "unknown-known-covariate",
        "variates",
        "covariates-on-bolt",
    ],
)
def test_bad_backtests_are_422_naming_the_field_and_queue_nothing(api, redis_server, overrides, field):
    client = redis_server.client()
    before = set(client.scan_iter("cq:job:*"))

    answer = api.post("/v1/backtests", json=request(**overrides))

    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == PROBLEM and answer.json()["field"] == field
    assert set(client.scan_iter("cq:job:*")) == before


def test_too_many_origins_is_limit_exceeded(redis_server):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from conftest import API_KEY, settings_for

    with TestClient(
        create_app(settings_for(redis_server, max_backtest_origins=10)), headers={"X-API-Key": API_KEY}
    ) as api:
        answer = api.post("/v1/backtests", json=request())

    assert (
        answer.status_code == 422 and answer.json()["code"] == "limit-exceeded" and answer.json()["field"] == "origins"
    )
