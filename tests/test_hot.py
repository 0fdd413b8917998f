"""The hot routes served past FastAPI's router (api/hot.py): the same answers as through the router,
side by side, errors included, and the router really skipped."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.hot import HOT, HotRoutes
from conftest import API_KEY, forecast_body, settings_for

NO_WORKER = "amazon/chronos-bolt-mini"  # no test worker serves it: its jobs stay queued


def _client(redis_server, hot: bool) -> TestClient:
    from api.main import create_app

    app = create_app(settings_for(redis_server))
    if not hot:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not HotRoutes]
    # As a server answers: an unhandled error is a 500, not an exception raised in the test.
    return TestClient(app, headers={"X-API-Key": API_KEY}, raise_server_exceptions=False)


@pytest.fixture()
def both(redis_server) -> Iterator[tuple[TestClient, TestClient]]:
    with _client(redis_server, hot=True) as hot, _client(redis_server, hot=False) as plain:
        yield hot, plain


def _seen(answer) -> tuple:
    """An answer as a client sees it, less what differs from one request to the next."""
    varying = {"date", "x-request-id", "location", "content-length"}
    headers = {name: value for name, value in answer.headers.items() if name not in varying}
    body = answer.json() if answer.content and "json" in answer.headers.get("content-type", "") else answer.text
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "created_at", "request_id")}
    return answer.status_code, headers, body


def test_hot_routes_answer_as_fastapis_router_does(both, monkeypatch):
    from api import answers

    hot, plain = both
    body = forecast_body(NO_WORKER, length=20, horizon=4)
    job = plain.post("/v1/forecasts", json=body)
    assert job.status_code == 202
    requests = [
        ("GET", f"/v1/forecasts/{job.json()['id']}", {}),
        ("GET", "/v1/forecasts/nope", {}),
        ("GET", "/v1/forecasts/nope", {"headers": {"X-API-Key": "wrong"}}),
        ("GET", "/v1/forecasts/nope?wait=soon", {}),
        ("GET", "/v1/forecasts/", {}),
        ("GET", "/v1/forecasts/a%2Fb", {}),
        ("HEAD", "/v1/forecasts/nope", {}),
        ("PUT", "/v1/forecasts/nope", {}),
        ("POST", "/v1/forecasts", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/forecasts", {"json": forecast_body(NO_WORKER, horizon=0)}),
        ("POST", "/v1/forecasts", {"json": body}),
        ("POST", "/v1/predict", {"json": body}),
        ("POST", "/predict", {"json": {"model": NO_WORKER, "input": body["inputs"][0], "parameters": body["parameters"]}}),
        ("POST", "/predict/batch", {"json": {"model": NO_WORKER, "requests": body["inputs"] * 2}}),
    ]  # fmt: skip
    for method, path, options in requests:
        assert _seen(hot.request(method, path, **options)) == _seen(plain.request(method, path, **options)), (method, path)

    def broken(request):
        raise RuntimeError("boom")

    monkeypatch.setattr(answers, "owner_of", broken)
    failed = [client.get("/v1/forecasts/nope", headers={"X-Request-Id": "req-500"}) for client in (hot, plain)]
    assert _seen(failed[0]) == _seen(failed[1])
    assert failed[0].status_code == 500 and failed[0].json()["code"] == "internal-error" and "boom" not in failed[0].text


def test_an_unhandled_error_is_a_500_problem_with_the_request_id_in_its_answer_and_log_line(both, monkeypatch, caplog):
    """Starlette answers it outside every middleware of the app, the request id's included."""
    from api import answers, security

    def broken(request):
        raise RuntimeError("boom")

    monkeypatch.setattr(answers, "owner_of", broken)
    caplog.handler.addFilter(security.RequestIdFilter())
    for client in both:  # served past FastAPI's router, and through it
        failed = client.get("/v1/forecasts/nope", headers={"X-Request-Id": "req-500"})
        assert failed.status_code == 500 and failed.headers["content-type"] == "application/problem+json"
        assert failed.headers["x-request-id"] == "req-500" and failed.headers["x-content-type-options"] == "nosniff"
        assert "req-500" in failed.json()["detail"]
    # A Redis error that is not a full memory: a 500 too, answered inside the middlewares.
    def refused_by_redis(request):
        raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    monkeypatch.setattr(answers, "owner_of", refused_by_redis)
    for client in both:
        refused = client.get("/v1/forecasts/nope", headers={"X-Request-Id": "req-500"})
        assert refused.status_code == 500 and refused.json()["code"] == "internal-error"
        assert refused.headers.get_list("x-request-id") == ["req-500"] and "req-500" in refused.json()["detail"]
    given_ids = ["req-500"] * 4
    # No id sent (one is made) or "-" (the logs' "no request"): one id, once, in the answer and its line.
    for client in both:
        for sent in ({}, {"X-Request-Id": "-"}):
            for raised in (broken, refused_by_redis):
                monkeypatch.setattr(answers, "owner_of", raised)
                failed = client.get("/v1/forecasts/nope", headers=sent)
                (rid,) = failed.headers.get_list("x-request-id")
                assert failed.headers.get_list("x-frame-options") == ["DENY"] and rid in failed.json()["detail"]
                assert len(rid) == 32
                given_ids.append(rid)
    logged = [r for r in caplog.records if r.getMessage().startswith("unhandled error on GET")]
    assert [r.request_id for r in logged] == given_ids and all(r.exc_info for r in logged)


def test_a_hot_request_never_reaches_fastapis_router_and_others_still_do(both, monkeypatch):
    hot, plain = both
    routed: list[str] = []
    handle = APIRoute.handle

    async def spy(self, scope, receive, send):
        routed.append(self.path)
        return await handle(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", spy)
    hot.get("/v1/forecasts/nope")
    hot.get("/v1/models")
    plain.get("/v1/forecasts/nope")

    assert routed == ["/v1/models", "/v1/forecasts/{job_id}"]


def test_every_hot_route_is_the_route_fastapi_would_pick_for_its_paths(redis_server):
    """No route tried before a hot one (as the app includes its routers) takes any of its paths."""
    with _client(redis_server, hot=True) as client:
        (installed,) = [m for m in client.app.user_middleware if m.cls is HotRoutes]
        routes = [r for router in installed.kwargs["routers"] for r in router.routes if isinstance(r, APIRoute)]
    hot = [route for route in routes if route.endpoint in HOT]
    assert {route.path for route in hot} >= {"/v1/forecasts", "/v1/forecasts/{job_id}", "/v1/predict", "/predict"}
    for route in routes:
        for value in ("x1", "models", "events", "a.b-c_d"):
            path = re.sub(r"\{[^}]+\}", value, route.path)
            for method in route.methods:
                first = next(r for r in routes if method in r.methods and r.path_regex.match(path))
                first_hot = next((r for r in hot if method in r.methods and r.path_regex.match(path)), None)
                assert first_hot in (None, first), (method, path, first.path, first_hot.path)
