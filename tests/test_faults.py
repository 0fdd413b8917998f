"""Faults: the API while Redis is away, and back."""

from __future__ import annotations

import signal

import pytest
from fastapi.testclient import TestClient

from api.main import create_app

from conftest import API_KEY, forecast_body, settings_for, start_redis

pytestmark = pytest.mark.integration


def test_api_answers_503_while_redis_is_away_and_recovers_without_a_restart(tmp_path):
    redis_server = start_redis(tmp_path / "redis")
    app = create_app(settings_for(redis_server))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as api:
        before = api.post("/v1/forecasts", json=forecast_body("amazon/chronos-bolt-mini"))
        redis_server.process.send_signal(signal.SIGKILL)
        redis_server.process.wait(10)

        away = [
            api.post("/v1/forecasts", json=forecast_body("amazon/chronos-bolt-mini")),
            api.get(f"/v1/forecasts/{before.json()['id']}"),
            api.get("/v1/models"),
            api.get("/readyz"),
        ]
        back = start_redis(tmp_path / "redis", port=redis_server.port)  # same port, empty (no persistence here)
        try:
            again = api.post("/v1/forecasts", json=forecast_body("amazon/chronos-bolt-mini"))
            ready = api.get("/readyz")
        finally:
            back.process.terminate()
            back.process.wait(10)

    assert before.status_code == 202
    assert [r.status_code for r in away] == [503, 503, 503, 503]
    for response in away:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "redis-unavailable" and response.headers["retry-after"] == "1"
    assert again.status_code == 202 and ready.status_code == 200
