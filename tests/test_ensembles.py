"""Ensembles (ENSEMBLES, api/ensembles.py): a request fans out one job per member on real workers, and
the answer combines the members' quantiles; sync on /v1/predict, async on /v1/forecasts."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared import catalog

from conftest import API_KEY, BOLT, forecast_body, settings_for, start_worker, wait_for

pytestmark = pytest.mark.integration

MINI = "amazon/chronos-bolt-mini"  # no session worker: this module starts its own
UNSERVED = "amazon/chronos-bolt-small"
ENSEMBLES = (f"ens-median=median({BOLT},{MINI}); ens-mean=mean(chronos-bolt-tiny,chronos-bolt-mini);"
             f"ens-broken=median({BOLT},{UNSERVED})")  # fmt: skip


@pytest.fixture(scope="module")
def mini_worker(redis_server, synthetic_dir, tmp_path_factory, workers):
    from workers import synthetic

    spec = catalog.get(MINI)
    if not (synthetic_dir / spec.slug).exists():
        synthetic.build(spec, synthetic_dir / spec.slug, seed=0)
    worker = start_worker(redis_server, synthetic_dir, MINI, tmp_path_factory.mktemp("logs"))
    yield worker
    worker.stop()


@pytest.fixture()
def api(redis_server, mini_worker) -> Iterator[TestClient]:
    settings = settings_for(redis_server, heartbeat_s=1, ensembles=ENSEMBLES)
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def body(model: str, **params) -> dict:
    return forecast_body(model, n_series=2, length=80, horizon=6, quantile_levels=[0.1, 0.5, 0.9], **params)


def direct(api: TestClient, model: str) -> list[dict]:
    response = api.post("/v1/predict", json=body(model))
    assert response.status_code == 200, response.json()
    return response.json()["predictions"]


@pytest.mark.parametrize(("ensemble", "combine"), [("ens-median", np.median), ("ens-mean", np.mean)])
def test_an_ensemble_answers_the_combination_of_its_members_direct_answers_per_quantile(api, ensemble, combine):
    answer = api.post("/v1/predict", json=body(ensemble, ensemble_members=True))
    tiny, mini = direct(api, BOLT), direct(api, MINI)

    got = answer.json()
    assert answer.status_code == 200, got
    assert got["model"] == got["served_by"] == ensemble and answer.headers["served-by"] == ensemble
    for i, series in enumerate(got["predictions"]):
        assert series["item_id"] == f"s{i}"
        for key in ("mean", "0.1", "0.5", "0.9"):
            expected = combine(np.array([tiny[i][key], mini[i][key]], dtype=np.float32), axis=0)
            assert series[key] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
    assert [m["model"] for m in got["members"]] == [BOLT, MINI]
    assert got["members"][1]["predictions"][0]["0.5"] == pytest.approx(mini[0]["0.5"], rel=1e-5, abs=1e-6)


def test_members_are_listed_only_when_asked_for(api):
    answer = api.post("/v1/predict", json=body("ens-median"))

    assert answer.status_code == 200 and answer.json()["members"] is None


def test_a_member_that_cannot_run_fails_the_ensemble_unless_partial_answers_are_allowed(api):
    strict = api.post("/v1/predict", json=body("ens-broken"))
    partial = api.post("/v1/predict", json=body("ens-broken", ensemble_partial=True, ensemble_members=True))
    alone = direct(api, BOLT)

    assert strict.status_code == 503 and strict.json()["code"] == "no-worker" and UNSERVED in strict.json()["detail"]
    assert partial.status_code == 200
    assert [(m["model"], m["status"]) for m in partial.json()["members"]] == [(BOLT, "succeeded"), (UNSERVED, "refused")]
    assert partial.json()["predictions"][1]["0.9"] == pytest.approx(alone[1]["0.9"], rel=1e-5, abs=1e-6)


def test_ensembles_are_listed_with_their_members(api):
    listed = {view["id"]: view for view in api.get("/v1/models").json()}

    assert listed["ens-median"]["family"] == "ensemble" and listed["ens-median"]["members"] == [BOLT, MINI]
    assert listed["ens-median"]["combine"] == "median" and listed["ens-median"]["workers_online"] == 1
    assert listed["ens-broken"]["workers_online"] == 0


def test_an_async_ensemble_job_reads_as_the_combination_once_its_members_end(api):
    accepted = api.post("/v1/forecasts", json=body("ens-mean", ensemble_members=True))
    done = wait_for(api, accepted.json()["id"])
    tiny, mini = direct(api, BOLT), direct(api, MINI)

    assert accepted.status_code == 202 and accepted.headers["served-by"] == "ens-mean"
    assert accepted.headers["location"] == f"/v1/forecasts/{accepted.json()['id']}"
    assert done["status"] == "succeeded" and done["model"] == done["served_by"] == "ens-mean"
    expected = np.mean(np.array([tiny[1]["0.1"], mini[1]["0.1"]], dtype=np.float32), axis=0)
    assert done["predictions"][1]["0.1"] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
    assert [(m["model"], m["status"]) for m in done["members"]] == [(BOLT, "succeeded"), (MINI, "succeeded")]


def test_a_cancelled_member_fails_an_async_ensemble_unless_partial_answers_are_allowed(api):
    strict = api.post("/v1/forecasts", json=body("ens-broken", ensemble_members=True)).json()
    partial = api.post("/v1/forecasts", json=body("ens-broken", ensemble_members=True, ensemble_partial=True)).json()
    for job in (strict, partial):  # the chronos-bolt-small member waits for a worker that never comes
        (stuck,) = [m["job_id"] for m in job["members"] if m["model"] == UNSERVED]
        api.delete(f"/v1/forecasts/{stuck}")

    failed, answered = wait_for(api, strict["id"]), wait_for(api, partial["id"])

    assert failed["status"] == "failed" and f"{UNSERVED} (job" in failed["error"] and "cancelled" in failed["error"]
    assert answered["status"] == "succeeded"
    assert answered["predictions"][0]["0.5"] == pytest.approx(direct(api, BOLT)[0]["0.5"], rel=1e-5, abs=1e-6)


def test_cancelling_an_ensemble_job_cancels_its_members(api, redis_server):
    job = api.post("/v1/forecasts", json=body("ens-broken", ensemble_members=True)).json()
    (stuck,) = [m["job_id"] for m in job["members"] if m["model"] == UNSERVED]

    cancelled = api.delete(f"/v1/forecasts/{job['id']}")

    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert redis_server.client().hget(f"cq:job:{stuck}", "status") == "cancelled"
