"""Prometheus metrics: the API's (latency by route, queue depth, workers) and each worker's."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import API_KEY, BOLT, forecast_body, wait_for

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_api_metrics_count_requests_by_route_template_and_show_queues_and_workers(api, workers):
    queued = api.post("/v1/forecasts", json=forecast_body("amazon/chronos-bolt-mini")).json()  # no worker: stays
    api.get(f"/v1/forecasts/{queued['id']}")
    del api.headers["X-API-Key"]

    text = api.get("/metrics").text  # no key needed, like the other probes

    assert value(text, "chronos_queue_http_request_duration_seconds_count",
                 method="GET", route="/v1/forecasts/{job_id}", status="200") >= 1  # fmt: skip
    assert value(text, "chronos_queue_jobs_accepted_total", model="amazon/chronos-bolt-mini", lane="async") >= 1
    assert value(text, "chronos_queue_queue_depth", model="amazon/chronos-bolt-mini", lane="async") >= 1
    assert value(text, "chronos_queue_workers_online", model=BOLT) >= 1
    assert queued["id"] not in text  # route templates, not raw paths
    api.headers["X-API-Key"] = API_KEY
    api.delete(f"/v1/forecasts/{queued['id']}")


def test_a_worker_exposes_jobs_batches_queue_wait_and_load_time(api, workers):
    url = f"http://127.0.0.1:{workers[BOLT].metrics_port}/metrics"
    before = httpx.get(url, timeout=5).text

    done = wait_for(api, api.post("/v1/forecasts", json=forecast_body(BOLT, n_series=3)).json()["id"])
    after = httpx.get(url, timeout=5).text

    assert done["status"] == "succeeded"

    def grew(name: str, **labels) -> float:
        return value(after, name, model=BOLT, **labels) - value(before, name, model=BOLT, **labels)

    assert grew("chronos_queue_worker_jobs_total", outcome="succeeded") == 1
    assert grew("chronos_queue_worker_series_total") == 3
    assert grew("chronos_queue_worker_batch_size_count") == 1 and grew("chronos_queue_worker_batch_size_sum") == 3
    assert grew("chronos_queue_worker_queue_wait_seconds_count", lane="async") == 1
    assert grew("chronos_queue_worker_inference_seconds_count") == 1
    assert value(after, "chronos_queue_worker_model_load_seconds", model=BOLT) > 0
