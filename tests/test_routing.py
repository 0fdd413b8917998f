"""Which model serves a request: fallback chains and A/B splits (api/routing.py), end to end on the
session's real workers, and the split's hashing over many ids."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.routing import arm, parse_ensembles, parse_fallbacks, parse_splits, split_point
from shared import catalog
from shared.series import SeriesSet

from conftest import API_KEY, BOLT, forecast_body, settings_for, wait_for

pytestmark = pytest.mark.integration

UNSERVED = "amazon/chronos-bolt-small"  # no session worker serves it
ALSO_UNSERVED = "amazon/chronos-bolt-base"


@pytest.fixture()
def routed(redis_server, workers) -> Iterator[TestClient]:
    settings = settings_for(
        redis_server, heartbeat_s=1, fallbacks=f"{ALSO_UNSERVED}>{UNSERVED}>{BOLT}",
        ab_splits="chronos-bolt-mini=50,chronos-bolt-tiny=50",
    )  # fmt: skip
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def test_a_sync_call_for_a_model_without_a_worker_is_served_by_the_next_live_model_of_its_chain(routed):
    response = routed.post("/v1/predict", json=forecast_body(ALSO_UNSERVED, horizon=5))

    body = response.json()
    assert response.status_code == 200, body
    assert response.headers["served-by"] == BOLT and body["served_by"] == BOLT
    assert body["model"] == ALSO_UNSERVED
    assert len(body["predictions"][0]["mean"]) == 5  # the same horizon, from the fallback


def test_a_sync_call_served_by_its_own_model_names_that_model(routed):
    response = routed.post("/v1/predict", json=forecast_body(BOLT, horizon=3))

    assert response.status_code == 200
    assert response.headers["served-by"] == BOLT and response.json()["served_by"] == BOLT == response.json()["model"]


def test_an_async_job_stays_on_its_model_unless_it_allows_a_fallback(routed):
    kept = routed.post("/v1/forecasts", json=forecast_body(UNSERVED, horizon=4))
    moved = routed.post("/v1/forecasts", json=forecast_body(UNSERVED, horizon=4, allow_fallback=True))

    assert kept.status_code == 202 and moved.status_code == 202
    assert kept.json()["served_by"] == UNSERVED and kept.headers["served-by"] == UNSERVED
    assert kept.json()["status"] == "queued"
    done = wait_for(routed, moved.json()["id"])
    assert done["status"] == "succeeded" and done["served_by"] == BOLT and done["model"] == UNSERVED
    routed.delete(f"/v1/forecasts/{kept.json()['id']}")


def test_a_split_sends_each_item_id_to_the_same_arm_every_time(routed):
    def served(item: str) -> str:
        body = forecast_body("chronos-bolt-mini", horizon=3)
        body["inputs"][0]["item_id"] = item
        return routed.post("/v1/forecasts", json=body).json()["served_by"]

    items = [f"store-{k}" for k in range(12)]
    first = {item: served(item) for item in items}
    again = {item: served(item) for item in items}
    metrics = routed.get("/metrics").text

    assert first == again
    assert set(first.values()) == {"amazon/chronos-bolt-mini", BOLT}  # 12 ids at 50 %: both arms, all but surely
    assert 'chronos_queue_ab_requests_total{arm="amazon/chronos-bolt-tiny",model="amazon/chronos-bolt-mini"}' in metrics


def _series(item: str | None, values: list[float]) -> SeriesSet:
    import numpy as np

    return SeriesSet(
        values=np.array(values), offsets=np.array([0, len(values)]), variates=np.array([1]), item_ids=[item],
        starts=[None],
    )  # fmt: skip


def test_a_split_sends_close_to_its_share_of_many_item_ids_to_the_candidate():
    arms = parse_splits("chronos-bolt-small=90,chronos-bolt-base=10")["amazon/chronos-bolt-small"]

    picked = [arm(arms, split_point(_series(f"item-{k}", [1.0]))).id for k in range(20_000)]

    share = picked.count("amazon/chronos-bolt-base") / len(picked)
    assert 0.09 < share < 0.11


def test_a_request_without_item_ids_is_split_by_its_first_series_values():
    arms = parse_splits("chronos-bolt-small=50,chronos-bolt-base=50")["amazon/chronos-bolt-small"]

    picks = {arm(arms, split_point(_series(None, [float(k), 2.0]))).id for k in range(64)}
    same = {arm(arms, split_point(_series(None, [7.0, 2.0]))).id for _ in range(5)}

    assert picks == {"amazon/chronos-bolt-small", "amazon/chronos-bolt-base"} and len(same) == 1


def test_routing_settings_are_parsed_with_both_separators_and_unknown_models_refused():
    chains = parse_fallbacks("chronos-bolt-base>chronos-bolt-small>chronos-bolt-tiny;chronos-t5-small>chronos-t5-tiny")
    commas = parse_fallbacks("chronos-bolt-base>chronos-bolt-tiny,chronos-t5-small>chronos-t5-tiny")
    ensembles = parse_ensembles("ens=median(chronos-bolt-small,chronos-2)")

    assert [s.slug for s in chains["amazon/chronos-bolt-base"]] == ["chronos-bolt-small", "chronos-bolt-tiny"]
    assert chains["amazon/chronos-bolt-tiny"] == () and set(commas) == {
        "amazon/chronos-bolt-base", "amazon/chronos-bolt-tiny", "amazon/chronos-t5-small", "amazon/chronos-t5-tiny"
    }  # fmt: skip
    assert ensembles["ens"].combine == "median" and ensembles["ens"].members[1] is catalog.get("amazon/chronos-2")
    for bad in (lambda: parse_fallbacks("chronos-bolt-huge>chronos-bolt-tiny"),
                lambda: parse_splits("chronos-bolt-small=90"),
                lambda: parse_ensembles("ens=max(chronos-bolt-small,chronos-2)")):  # fmt: skip
        with pytest.raises(ValueError):
            bad()
