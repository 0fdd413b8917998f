"""API keys and owner isolation: a key sees only its own jobs; everything else is 401 or 404."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.main import create_app

from conftest import API_KEY, OTHER_KEY, forecast_body, job_keys, settings_for

QUEUED_MODEL = "amazon/chronos-bolt-mini"  # no worker serves it in the tests: its jobs stay queued


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}])
def test_a_missing_or_wrong_key_is_401_and_accepts_nothing(api, redis_server, headers):
    del api.headers["X-API-Key"]
    before = job_keys(redis_server.client())

    response = api.post("/v1/forecasts", json=forecast_body(QUEUED_MODEL), headers=headers)

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert "wrong" not in response.text
    assert job_keys(redis_server.client()) == before


def test_a_key_works_as_x_api_key_and_as_bearer(api):
    del api.headers["X-API-Key"]

    as_header = api.get("/v1/models", headers={"X-API-Key": OTHER_KEY})
    as_bearer = api.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"})

    assert as_header.status_code == as_bearer.status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"X-API-Key": OTHER_KEY}, 200),
        ({"Authorization": f"bearer  {OTHER_KEY} "}, 200),  # any case; spaces around the token
        ({"X-API-Key": "", "Authorization": f"Bearer {OTHER_KEY}"}, 200),  # an empty X-API-Key is no key
        ({"X-API-Key": "wrong", "Authorization": f"Bearer {OTHER_KEY}"}, 401),  # X-API-Key wins
        ({"Authorization": f"Basic {OTHER_KEY}"}, 401),
        ({"Authorization": "Bearer"}, 401),
    ],
)
def test_hot_routes_read_the_key_as_the_declared_security_does(api, headers, status):
    """`GET /v1/forecasts/{id}` and `POST /v1/forecasts` read the key by hand (api/deps.py);
    `GET /v1/models` declares it. All three answer alike."""
    job_id = api.post("/v1/forecasts", json=forecast_body(QUEUED_MODEL), headers={"X-API-Key": OTHER_KEY}).json()["id"]
    del api.headers["X-API-Key"]

    answers = [
        api.get("/v1/models", headers=headers),
        api.get(f"/v1/forecasts/{job_id}", headers=headers),
        api.post("/v1/forecasts", json=forecast_body(QUEUED_MODEL), headers=headers),
    ]

    assert [a.status_code for a in answers] == [status, status, 202 if status == 200 else status]


def test_a_too_long_header_is_the_same_422_on_hot_and_declared_routes(api):
    too_long = {"Idempotency-Key": "k" * 256}

    hot = api.post("/v1/forecasts", json=forecast_body(QUEUED_MODEL), headers=too_long)
    declared = api.post("/v1/backtests", json={}, headers=too_long)
    prefer = api.post("/v1/forecasts", json=forecast_body(QUEUED_MODEL), headers={"Prefer": "wait=1" + " " * 255})

    assert hot.status_code == declared.status_code == prefer.status_code == 422
    assert hot.json()["field"] == declared.json()["field"] == "Idempotency-Key"
    assert hot.json()["detail"] == declared.json()["detail"]
    assert prefer.json()["field"] == "Prefer"


def test_the_key_is_checked_before_query_parameters_and_a_bad_one_is_a_422_naming_it(api):
    keyless = {"X-API-Key": ""}

    assert api.get("/v1/forecasts/x", params={"wait": -1}, headers=keyless).status_code == 401
    assert api.post("/v1/predict", params={"timeout": 0}, json={}, headers=keyless).status_code == 401
    negative = api.get("/v1/forecasts/x", params={"wait": -1})
    word = api.get("/v1/forecasts/x", params={"wait": "soon"})
    zero = api.post("/v1/predict", params={"timeout": 0}, json=forecast_body(QUEUED_MODEL))

    assert [negative.status_code, word.status_code, zero.status_code] == [422, 422, 422]
    assert negative.json()["detail"] == "wait: Input should be greater than or equal to 0"
    assert word.json()["field"] == "wait" and "valid number" in word.json()["detail"]
    assert zero.json()["detail"] == "timeout: Input should be greater than 0"


def test_another_keys_job_is_404_to_read_wait_on_and_cancel_and_stays_untouched(api):
    job_id = api.post("/v1/forecasts", json=forecast_body(QUEUED_MODEL)).json()["id"]
    other = {"X-API-Key": OTHER_KEY}

    answers = [
        api.get(f"/v1/forecasts/{job_id}", headers=other),
        api.get(f"/v1/forecasts/{job_id}", params={"wait": 0.2}, headers=other),
        api.delete(f"/v1/forecasts/{job_id}", headers=other),
    ]

    assert [a.status_code for a in answers] == [404, 404, 404]
    assert answers[0].json()["code"] == "unknown-job"
    # The same answer as for an id that never existed: nothing confirms the job is there.
    assert answers[0].json()["detail"].replace(job_id, "X") == api.get("/v1/forecasts/X").json()["detail"]
    mine = api.get(f"/v1/forecasts/{job_id}").json()
    assert mine["status"] == "queued" and mine["cancel_requested"] is False
    assert api.delete(f"/v1/forecasts/{job_id}").status_code == 200


def test_probes_and_docs_need_no_key(api):
    del api.headers["X-API-Key"]

    assert [api.get(path).status_code for path in ("/healthz", "/readyz", "/health", "/openapi.json", "/docs")] == [
        200
    ] * 5


def test_the_api_refuses_to_start_without_keys_unless_auth_is_disabled_explicitly(redis_server):
    with pytest.raises(RuntimeError, match="API_KEYS"):
        create_app(settings_for(redis_server, api_keys=None))

    with TestClient(create_app(settings_for(redis_server, api_keys=None, auth_disabled=True))) as open_api:
        job = open_api.post("/v1/forecasts", json=forecast_body(QUEUED_MODEL))
        assert job.status_code == 202
        assert open_api.delete(f"/v1/forecasts/{job.json()['id']}").status_code == 200


def test_keys_are_read_from_a_file_with_comments(redis_server, tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team a\nfile-key-1\n\n  file-key-2  \n")
    app = create_app(settings_for(redis_server, api_keys=None, api_keys_file=str(path)))

    with TestClient(app) as client:
        statuses = [client.get("/v1/models", headers={"X-API-Key": k}).status_code for k in ("file-key-2", "# team a")]

    assert statuses == [200, 401]


def test_every_answer_carries_security_headers_and_a_request_id(api):
    chosen = api.get("/v1/models", headers={"X-Request-Id": "trace-123"})
    made = api.get("/v1/forecasts/nope")

    for response in (chosen, made):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
    assert chosen.headers["x-request-id"] == "trace-123"
    assert len(made.headers["x-request-id"]) == 32
    assert (
        "access-control-allow-origin" not in api.get("/v1/models", headers={"Origin": "https://evil.example"}).headers
    )


def test_cors_answers_only_configured_origins(redis_server):
    app = create_app(settings_for(redis_server, cors_origins="https://dash.example"))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        allowed = client.get("/v1/models", headers={"Origin": "https://dash.example"})
        other = client.get("/v1/models", headers={"Origin": "https://evil.example"})

    assert allowed.headers["access-control-allow-origin"] == "https://dash.example"
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("origins", ["https://dash.example", "*"])
def test_an_unhandled_errors_500_carries_the_cors_headers_any_answer_does(redis_server, monkeypatch, origins):
    """Starlette answers it outside every middleware, CORS's included: without its headers a browser
    would show a CORS error instead of the 500 and its request id."""
    from api import answers

    def cors_of(answer) -> dict:
        return {k: v for k, v in answer.headers.items() if k.startswith("access-control-") or k == "vary"}

    app = create_app(settings_for(redis_server, cors_origins=origins))
    with TestClient(app, headers={"X-API-Key": API_KEY}, raise_server_exceptions=False) as client:
        for sent in ({"Origin": "https://dash.example"}, {"Origin": "https://evil.example"}, {}):
            handled = client.get("/v1/forecasts/nope", headers=sent)  # a 404 through every middleware
            with monkeypatch.context() as patch:
                patch.setattr(answers, "owner_of", lambda request: 1 / 0)
                failed = client.get("/v1/forecasts/nope", headers=sent)
            assert (handled.status_code, failed.status_code) == (404, 500)
            assert failed.json()["code"] == "internal-error"
            assert cors_of(failed) == cors_of(handled), sent
            if sent and (origins == "*" or sent["Origin"] == origins):
                assert failed.headers["access-control-allow-origin"] in (sent["Origin"], "*")
                assert "X-Request-Id" in failed.headers["access-control-expose-headers"]
