"""Request bodies as arrays: the fast JSON parser agrees with the documented models, Arrow and
Parquet bodies and answers, and hostile bodies are refused cheaply, before any series is stored."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from api import bodies, limits
from api.problems import Problem
from shared.schemas import SeriesInput
from shared.settings import Settings

from conftest import BOLT, forecast_body, job_keys, wait_for

ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
SETTINGS = Settings(_env_file=None, auth_disabled=True)
values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-(10**6), 10**6))


def fast_accepts(target: list) -> bool:
    body = json.dumps({"model": BOLT, "inputs": [{"target": target}], "parameters": {"prediction_length": 2}})
    try:
        job = bodies.forecast_json(body.encode(), SETTINGS)
        limits.check_values(job.series, job.field)
        return True
    except Problem as problem:
        assert problem.status in (400, 422) and problem.field and problem.field.startswith("inputs[0].target")
        return False


@settings(max_examples=200, deadline=None)
@given(st.lists(values, max_size=30))
def test_the_fast_parser_accepts_a_target_exactly_when_the_documented_model_does(target):
    try:
        SeriesInput(target=target)
        documented = True
    except ValidationError:
        documented = False

    assert fast_accepts(target) == documented


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b["parameters"].update(prediction_length=True), "parameters.prediction_length"),
        (lambda b: b["parameters"].update(prediction_length="5"), "parameters.prediction_length"),
        (lambda b: b["inputs"][0].update(target=["1", 2.0]), "inputs[0].target[0]"),
        (lambda b: b["inputs"][0].update(target=[True, 2.0]), "inputs[0].target[0]"),
        (lambda b: b["inputs"][0].update(target=[1e39, 1e39, 2e39, 1.0]), "inputs[0].target"),
        (lambda b: b["inputs"][0].update(target=[1.0, -1e39, 2.0]), "inputs[0].target"),
    ],
    ids=["bool-horizon", "string-horizon", "string-value", "bool-value", "beyond-float32", "below-float32"],
)
def test_numbers_are_strict_and_must_fit_float32(api, redis_server, change, field):
    body = forecast_body(BOLT)
    change(body)
    before = job_keys(redis_server.client())

    response = api.post("/v1/forecasts", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert job_keys(redis_server.client()) == before


def test_a_huge_body_without_a_key_is_refused_before_it_is_read_and_the_api_stays_responsive(live_api):
    import socket
    from urllib.parse import urlsplit

    import httpx

    url = urlsplit(live_api)
    head = (f"POST /v1/forecasts HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 50000000\r\n\r\n").encode()  # fmt: skip

    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(head + b'{"model": "amazon/chronos-bolt-tiny", "inputs": [{"target": [' + b"1," * 32_000)
        answer = conn.recv(65536).decode(errors="replace")  # while the other 50 MB are "still coming"
        health = httpx.get(f"{live_api}/healthz", timeout=30)

    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert health.status_code == 200


def test_a_target_with_more_points_than_any_limit_allows_is_refused_before_its_numbers_are_parsed():
    small = Settings(_env_file=None, auth_disabled=True, max_points=100, max_variates=2)
    body = b'{"model": "m", "inputs": [{"target": [' + b"1," * 1000 + b'1]}], "parameters": {"prediction_length": 2}}'

    with pytest.raises(Problem) as refused:
        bodies.forecast_json(body, small)

    assert refused.value.code == "limit-exceeded" and refused.value.field == "inputs[0].target"


def test_no_trailing_slash_redirect_names_the_clients_host(api):
    response = api.get("/v1/forecasts/", headers={"Host": "evil.example"}, follow_redirects=False)

    assert response.status_code == 404
    assert "location" not in response.headers


def long_table(body: dict) -> pa.Table:
    ids, values = [], []
    for series in body["inputs"]:
        ids += [series["item_id"]] * len(series["target"])
        values += series["target"]
    return pa.table({"item_id": ids, "target": pa.array(values, type=pa.float64())})


def arrow_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.mark.parametrize(("media_type", "encode"), [(ARROW, arrow_bytes), (PARQUET, parquet_bytes)])
def test_an_arrow_or_parquet_body_gives_the_same_forecasts_as_json(api, workers, media_type, encode):
    body = forecast_body(BOLT, n_series=3, length=60, horizon=5)
    by_json = wait_for(api, api.post("/v1/forecasts", json=body).json()["id"])
    query = {"model": BOLT, "prediction_length": 5, "quantile_levels": "0.1,0.5,0.9"}

    answer = api.post("/v1/forecasts", params=query, content=encode(long_table(body)),
                      headers={"content-type": media_type})  # fmt: skip
    assert answer.status_code == 202, answer.text
    by_table = wait_for(api, answer.json()["id"])

    assert [p["item_id"] for p in by_table["predictions"]] == ["s0", "s1", "s2"]
    for a, b in zip(by_json["predictions"], by_table["predictions"], strict=True):
        assert a["0.5"] == pytest.approx(b["0.5"], rel=1e-6)


def test_results_come_as_an_arrow_table_when_accept_asks_for_one(api, workers):
    body = forecast_body(BOLT, n_series=2, length=40, horizon=4)
    job = wait_for(api, api.post("/v1/forecasts", json=body).json()["id"])

    answer = api.get(f"/v1/forecasts/{job['id']}", headers={"Accept": ARROW})

    assert answer.status_code == 200 and answer.headers["content-type"] == ARROW
    table = pa.ipc.open_stream(answer.content).read_all()
    assert table.column_names == ["item_id", "step", "mean", "0.1", "0.5", "0.9"]
    assert table["item_id"].to_pylist() == ["s0"] * 4 + ["s1"] * 4 and table["step"].to_pylist() == [1, 2, 3, 4] * 2
    assert table["0.5"].to_pylist()[4:] == pytest.approx(job["predictions"][1]["0.5"], rel=1e-6)


def test_an_arrow_body_without_a_target_column_is_422_and_stores_nothing(api, redis_server):
    before = job_keys(redis_server.client())
    table = pa.table({"item_id": ["a", "a"], "value": [1.0, 2.0]})

    answer = api.post("/v1/forecasts", params={"model": BOLT, "prediction_length": 3}, content=arrow_bytes(table),
                      headers={"content-type": ARROW})  # fmt: skip

    assert answer.status_code == 422 and answer.json()["field"] == "target"
    assert job_keys(redis_server.client()) == before


def test_a_job_over_the_output_cap_is_422_naming_the_limit(redis_server):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from conftest import API_KEY, settings_for

    app = create_app(settings_for(redis_server, max_output_values=1000))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as capped:
        response = capped.post("/v1/forecasts", json=forecast_body(BOLT, n_series=20, length=20, horizon=20))

    assert response.status_code == 422
    assert response.json()["code"] == "limit-exceeded" and "MAX_OUTPUT_VALUES" in response.json()["detail"]


def test_series_are_stored_as_float32_arrays_one_element_per_series(api, redis_server):
    import redis

    from shared.store import keys
    from shared.series import decode

    body = forecast_body("amazon/chronos-bolt-mini", n_series=2, length=30)  # nobody serves it: stays queued
    body["inputs"][1]["target"][3] = None
    job_id = api.post("/v1/forecasts", json=body).json()["id"]

    stored = redis.Redis.from_url(redis_server.url).lrange(keys.job_input(job_id), 0, -1)

    assert len(stored) == 2
    second = decode(stored[1]).target
    assert second.dtype == np.float32 and second.shape == (1, 31) and math.isnan(second[0, 3])
    api.delete(f"/v1/forecasts/{job_id}")


def test_redis_out_of_memory_is_a_503_to_retry_not_a_500(tmp_path):
    import redis
    from fastapi.testclient import TestClient

    from api.main import create_app
    from conftest import API_KEY, settings_for, start_redis

    server = start_redis(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    filler = server.client()
    with pytest.raises(redis.ResponseError, match="maxmemory"):
        for i in range(10_000):
            filler.set(f"fill:{i}", "x" * 10_000)
    try:
        with TestClient(create_app(settings_for(server)), headers={"X-API-Key": API_KEY}) as api:
            response = api.post("/v1/forecasts", json=forecast_body(BOLT))
    finally:
        server.process.terminate()
        server.process.wait(10)

    assert response.status_code == 503, response.text
    assert response.json()["code"] == "redis-unavailable" and int(response.headers["retry-after"]) > 0


def test_a_compat_window_with_no_observed_value_is_422_not_500(api, redis_server):
    before = job_keys(redis_server.client())
    body = {"name": "SPY", "forecast_period_size": 2, "context_period_size": 1, "recent_data": [1.0, None]}

    response = api.post("/models/chronos-bolt-tiny/v1/timeseries/forecast", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "recent_data"
    assert job_keys(redis_server.client()) == before


def test_a_large_answer_is_streamed_and_equals_the_answer_in_one_piece(api, workers, monkeypatch):
    from api import render
    from api import answers

    job = wait_for(
        api, api.post("/v1/forecasts", json=forecast_body(BOLT, n_series=5, length=30, horizon=3)).json()["id"]
    )
    monkeypatch.setattr(answers, "STREAM_FROM", 2)
    monkeypatch.setattr(render, "PIECE", 2)  # three pieces: 2, 2 and 1 series

    streamed = api.get(f"/v1/forecasts/{job['id']}")

    assert streamed.status_code == 200 and "content-length" not in streamed.headers
    assert streamed.json() == job


@pytest.mark.parametrize("horizon", [True, "20"], ids=["bool", "numeric-string"])
def test_compat_numbers_are_strict_too(api, redis_server, horizon):
    before = job_keys(redis_server.client())
    body = {"name": "SPY", "forecast_period_size": horizon, "recent_data": [1.0, 2.0, 3.0], "unknown_field": "ignored"}

    response = api.post("/models/chronos-bolt-tiny/v1/timeseries/forecast", json=body)

    assert response.status_code == 422 and response.json()["field"] == "forecast_period_size"
    assert job_keys(redis_server.client()) == before


def test_a_huge_keyless_body_on_a_compat_route_is_refused_before_it_is_read(live_api):
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(live_api)
    declared = 50_000_000  # announced, never sent: the answer must come while the body is still "on its way"
    head = (f"POST /models/chronos-bolt-tiny/v1/timeseries/forecast HTTP/1.1\r\nHost: {url.hostname}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n").encode()  # fmt: skip

    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(head + b'{"name": "SPY", "forecast_period_size": 20, "recent_data": [' + b"1," * 32_000)
        answer = conn.recv(65536).decode(errors="replace")

    assert answer.startswith("HTTP/1.1 401"), answer[:200]


def test_a_backtest_from_a_parquet_series_scores_like_the_same_backtest_in_json(api, workers):
    target = [float(100 + (t % 9) + 0.1 * t) for t in range(60)]
    as_json = {"model": BOLT, "series": {"item_id": "SPY", "target": target}, "origins": {"first": 40, "last": 55},
               "context_length": 40, "parameters": {"prediction_length": 5, "quantile_levels": [0.1, 0.5, 0.9]}}  # fmt: skip
    by_json = wait_for(api, api.post("/v1/backtests", json=as_json).json()["id"])
    query = {"model": BOLT, "first": 40, "last": 55, "context_length": 40, "prediction_length": 5,
             "quantile_levels": "0.1,0.5,0.9"}  # fmt: skip

    answer = api.post("/v1/backtests", params=query, content=parquet_bytes(pa.table({"item_id": ["SPY"] * 60, "target": target})),
                      headers={"content-type": PARQUET})  # fmt: skip
    assert answer.status_code == 202, answer.text
    by_table = wait_for(api, answer.json()["id"])

    assert by_table["status"] == "succeeded" and by_table["progress"] == {"done": 16, "total": 16}
    assert by_table["backtest"]["metrics"]["mase"] == pytest.approx(by_json["backtest"]["metrics"]["mase"], rel=1e-5)


def test_a_key_over_its_rate_is_refused_before_its_body_is_read(redis_server):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from conftest import settings_for

    key = "rate-test-key"  # a bucket of its own: no other test's key is throttled
    app = create_app(settings_for(redis_server, api_keys=key, rate_limit_per_s=0.01, rate_limit_burst=1))
    malformed = {"content": b"{not json", "headers": {"content-type": "application/json", "X-API-Key": key}}
    with TestClient(app) as api:
        first = api.post("/v1/forecasts", **malformed)
        second = api.post("/v1/forecasts", **malformed)

    assert first.status_code == 400  # the token was taken, then the body read
    assert second.status_code == 429 and second.json()["code"] == "rate-limited"  # no token: the body is never read


@pytest.mark.parametrize(
    ("ends", "ids", "expected"),
    [([2, 5], ["b", "a"], {"b": [1.0, 2.0], "a": [3.0, 4.0, 5.0]}),
     ([2, 5, 7], ["b", "a", "b"], {"b": [1.0, 2.0, 6.0, 7.0], "a": [3.0, 4.0, 5.0]})],
    ids=["one-run-per-series", "a-series-in-two-runs"],
)  # fmt: skip
def test_run_end_encoded_item_ids_as_the_client_sends_them_give_the_series_in_order(ends, ids, expected):
    item_id = pa.RunEndEncodedArray.from_arrays(pa.array(ends, type=pa.int32()), pa.array(ids))
    table = pa.table({"item_id": item_id, "target": pa.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0][: ends[-1]])})

    job = bodies.forecast_columnar(arrow_bytes(table), ARROW, {"model": BOLT, "prediction_length": "2"}, SETTINGS)

    assert job.series.item_ids == list(expected)
    assert [job.series.rows(i)[0].tolist() for i in range(len(job.series))] == list(expected.values())
