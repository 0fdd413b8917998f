"""Schema-driven fuzzing: requests generated from the app's own OpenAPI document never get a
5xx other than the documented 'come back later' answers, and every error is problem+json."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, reject, settings

from api.main import create_app
from api.problems import MEDIA_TYPE
from shared.settings import Settings

from conftest import settings_for, start_redis

# Limits small enough that no generated request waits: every wait and timeout is capped at 0.2 s.
FAST = {"auth_disabled": True, "api_keys": None, "wait_max_s": 0.2, "sync_timeout_max_s": 0.2,
        "sync_timeout_default_s": 0.2, "compat_timeout_s": 0.2, "compat_init_wait_s": 0}  # fmt: skip
# 5xx answers that are part of the contract: nothing was lost, come back later.
# redis-unavailable included: /readyz gives Redis 1 s to answer a ping, which a loaded machine
# (the rest of the suite running workers) can miss. One full-suite run failed this test once and
# never again; that is the likeliest cause, not a confirmed one.
EXPECTED_5XX = {"no-worker", "queue-full", "forecast-timeout", "redis-unavailable",
                "broker-unavailable", "model-unavailable"}  # fmt: skip

schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None, **FAST)).openapi())


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """The app on a Redis of its own, so no test worker ever picks up a generated job."""
    redis_server = start_redis(tmp_path_factory.mktemp("fuzz-redis"))
    with TestClient(create_app(settings_for(redis_server, **FAST))) as test_client:
        yield test_client
    redis_server.process.terminate()
    redis_server.process.wait(10)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_no_unexpected_5xx_and_errors_are_problem_json(case, client):
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    if not all(str(value).isascii() for value in (kwargs.get("headers") or {}).values()):
        reject()  # a header HTTP cannot carry (e.g. 'Bearer \x80'): no client can send it, no server sees it
    response = client.request(
        kwargs["method"], kwargs["url"], params=kwargs.get("params"), headers=kwargs.get("headers"),
        json=kwargs.get("json"), content=kwargs.get("data"),
    )  # fmt: skip

    if response.status_code >= 400 and case.path != "/metrics":
        assert response.headers["content-type"] == MEDIA_TYPE, response.text
        problem = response.json()
        assert problem["status"] == response.status_code and problem["detail"]
        if response.status_code >= 500:
            assert problem["code"] in EXPECTED_5XX, problem
