"""Keys limited to scopes and models, admin keys, and the audit log: what a limited key is refused
(403, before the body is parsed), what an admin key sees of other owners' jobs (metadata, never
series or results), and the one audit line per request (never a key, never a value)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.auth import FORECAST, READ, Grant, KeyRing, parse_entry
from api.main import create_app

from conftest import API_KEY, BOLT, OTHER_KEY, forecast_body, job_keys, settings_for

QUEUED_MODEL = "amazon/chronos-bolt-mini"  # no worker serves it in the tests: its jobs stay queued
READER, BOLT_ONLY, FORECASTER, ADMIN = "reader-key-1", "bolt-only-key-1", "forecaster-key-1", "admin-key-1"
KEY_FILE = f"""# limited keys
{READER} scopes=read
{BOLT_ONLY} models=chronos-bolt-*,amazon/chronos-2 scopes=forecast,read
{FORECASTER} scopes=forecast
{ADMIN} scopes=admin
"""
# A value no test series holds by chance: neither the audit log nor an admin's view may show it.
MARK = 987654.321


@dataclass
class Scoped:
    client: TestClient
    audit: Path

    def call(self, key: str, method: str, path: str, **kwargs):
        headers = {"X-API-Key": key, **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def line(self, request_id: str) -> dict:
        (found,) = [line for line in self.lines() if line["request_id"] == request_id]
        return found


@pytest.fixture()
def scoped(redis_server, tmp_path) -> Iterator[Scoped]:
    """The API with the plain test keys, the limited keys of KEY_FILE, and its audit log in a file."""
    keys, audit = tmp_path / "keys", tmp_path / "audit.jsonl"
    keys.write_text(KEY_FILE)
    settings = settings_for(redis_server, heartbeat_s=1, api_keys_file=str(keys), audit_log=str(audit))
    with TestClient(create_app(settings)) as client:
        yield Scoped(client, audit)


def key_id(key: str) -> str:
    return KeyRing([key]).owner(key) or ""


def marked_body(model: str, length: int = 30) -> dict:
    """A one-series body whose first value is MARK; `length` keeps identical requests apart."""
    body = forecast_body(model, length=length, horizon=3)
    body["inputs"][0]["target"][0] = MARK
    return body


@pytest.mark.parametrize("path", ["/v1/forecasts", "/v1/predict", "/predict", "/predict/batch", "/v1/backtests"])
def test_a_key_without_the_forecast_scope_is_403_before_its_body_is_read(scoped, redis_server, path):
    before = job_keys(redis_server.client())

    response = scoped.call(READER, "POST", path, content=b'{"model": "amazon/chronos-bolt-tiny", "inputs": [',
                           headers={"content-type": "application/json", "X-Request-Id": "no-scope"})  # fmt: skip

    assert response.status_code == 403  # not 400: the malformed body was never parsed
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "missing-scope" and problem["scope"] == "forecast"
    assert problem["detail"].startswith("scope 'forecast' required")
    assert scoped.line("no-scope")["bytes_in"] == 0
    assert job_keys(redis_server.client()) == before
    assert scoped.call(READER, "GET", "/v1/models").status_code == 200


def test_a_key_without_the_read_scope_is_403_on_reads_and_may_cancel_its_own_job(scoped):
    job = scoped.call(FORECASTER, "POST", "/v1/forecasts", json=marked_body(QUEUED_MODEL, length=31))
    assert job.status_code == 202, job.text

    read = scoped.call(FORECASTER, "GET", f"/v1/forecasts/{job.json()['id']}")
    models = scoped.call(FORECASTER, "GET", "/v1/models")
    cancelled = scoped.call(FORECASTER, "DELETE", f"/v1/forecasts/{job.json()['id']}")

    assert [read.status_code, models.status_code] == [403, 403]
    assert read.json()["code"] == "missing-scope" and read.json()["scope"] == "read"
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_a_key_limited_to_models_is_403_for_another_model_before_the_series_are_parsed(scoped, redis_server):
    before = job_keys(redis_server.client())
    unparsable = {"model": "chronos-t5-tiny", "inputs": [{"target": [1.0, "x"]}], "parameters": {"prediction_length": 2}}

    as_json = scoped.call(BOLT_ONLY, "POST", "/v1/forecasts", json=unparsable,
                          headers={"X-Request-Id": "not-allowed"})  # a 422 for a key that may use T5
    as_arrow = scoped.call(BOLT_ONLY, "POST", "/v1/predict", params={"model": "amazon/chronos-t5-tiny"},
                           content=b"not arrow", headers={"content-type": "application/vnd.apache.arrow.stream"})
    backtest = scoped.call(BOLT_ONLY, "POST", "/v1/backtests", json={
        "model": "amazon/chronos-t5-tiny", "series": {"target": [1.0] * 20}, "origins": {"first": 10, "last": 12},
        "parameters": {"prediction_length": 2}})
    compat = scoped.call(BOLT_ONLY, "POST", "/models/chronos-t5-tiny/forecast/v1/chronos/inference",
                         json={"context": [1.0, 2.0, 3.0], "prediction_length": 2})  # fmt: skip

    for response in (as_json, as_arrow, backtest, compat):
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "model-not-allowed" and response.json()["field"] == "model"
    assert as_json.json()["detail"] == "model 'chronos-t5-tiny' not allowed for this key"
    assert as_arrow.json()["detail"] == "model 'amazon/chronos-t5-tiny' not allowed for this key"
    audited = scoped.line("not-allowed")
    assert (audited["status"], audited["model"], audited["key_id"]) == (403, "amazon/chronos-t5-tiny", key_id(BOLT_ONLY))
    assert job_keys(redis_server.client()) == before


def test_a_key_limited_to_models_may_use_them_by_id_or_slug(scoped):
    by_id = scoped.call(BOLT_ONLY, "POST", "/v1/forecasts", json=marked_body(QUEUED_MODEL, length=32))
    by_slug = scoped.call(BOLT_ONLY, "POST", "/v1/forecasts", json={**marked_body(QUEUED_MODEL, length=33),
                                                                       "model": "chronos-bolt-mini"})  # fmt: skip

    assert [by_id.status_code, by_slug.status_code] == [202, 202]
    for job in (by_id, by_slug):
        assert scoped.call(BOLT_ONLY, "DELETE", f"/v1/forecasts/{job.json()['id']}").status_code == 200


def test_an_admin_key_sees_another_keys_job_as_metadata_only_and_may_cancel_it(scoped, workers):
    done = scoped.call(API_KEY, "POST", "/v1/predict", params={"timeout": 30}, json=marked_body(BOLT, length=34))
    queued = scoped.call(API_KEY, "POST", "/v1/forecasts", json=marked_body(QUEUED_MODEL, length=35))
    assert done.status_code == 200 and done.json()["predictions"], done.text
    assert queued.status_code == 202, queued.text

    seen = scoped.call(ADMIN, "GET", f"/v1/forecasts/{done.json()['id']}")
    cancelled = scoped.call(ADMIN, "DELETE", f"/v1/forecasts/{queued.json()['id']}")

    assert seen.status_code == 200
    view = seen.json()
    assert view["id"] == done.json()["id"] and view["status"] == "succeeded" and view["model"] == BOLT
    assert view["owner"] == key_id(API_KEY)
    assert view["predictions"] is None and view["backtest"] is None
    assert str(MARK) not in seen.text and str(done.json()["predictions"][0]["mean"][0]) not in seen.text
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert scoped.call(API_KEY, "GET", f"/v1/forecasts/{queued.json()['id']}").json()["status"] == "cancelled"


def test_a_key_without_admin_still_gets_404_for_another_keys_job(scoped):
    job = scoped.call(API_KEY, "POST", "/v1/forecasts", json=marked_body(QUEUED_MODEL, length=36)).json()

    answers = [scoped.call(key, method, f"/v1/forecasts/{job['id']}")
               for key in (OTHER_KEY, BOLT_ONLY) for method in ("GET", "DELETE")]  # fmt: skip

    assert [a.status_code for a in answers] == [404] * 4
    assert scoped.call(API_KEY, "GET", f"/v1/forecasts/{job['id']}").json()["status"] == "queued"
    assert scoped.call(API_KEY, "DELETE", f"/v1/forecasts/{job['id']}").status_code == 200


def test_every_request_writes_one_audit_line_naming_the_key_by_id_never_the_key_nor_a_value(scoped):
    body = json.dumps(marked_body(QUEUED_MODEL, length=37)).encode()
    forbidden = scoped.call(READER, "POST", "/v1/forecasts", content=body,
                            headers={"content-type": "application/json", "X-Request-Id": "audit-403"})
    accepted = scoped.call(API_KEY, "POST", "/v1/forecasts", content=body,
                           headers={"content-type": "application/json", "X-Request-Id": "audit-202"})
    job_id = accepted.json()["id"]
    read = scoped.call(API_KEY, "GET", f"/v1/forecasts/{job_id}", headers={"X-Request-Id": "audit-get"})
    scoped.call(API_KEY, "DELETE", f"/v1/forecasts/{job_id}", headers={"X-Request-Id": "audit-delete"})
    scoped.call("wrong-secret-key", "GET", "/v1/models", headers={"X-Request-Id": "audit-401"})

    assert forbidden.status_code == 403 and accepted.status_code == 202 and read.status_code == 200
    lines = {rid: scoped.line(rid) for rid in ("audit-403", "audit-202", "audit-get", "audit-delete", "audit-401")}
    assert lines["audit-403"] | {"time": None, "duration_s": None} == {
        "time": None, "request_id": "audit-403", "key_id": key_id(READER), "method": "POST", "route": "/v1/forecasts",
        "model": None, "job_id": None, "status": 403, "duration_s": None, "bytes_in": 0,
        "bytes_out": len(forbidden.content),
    }  # fmt: skip
    assert lines["audit-202"]["key_id"] == key_id(API_KEY) and lines["audit-202"]["status"] == 202
    assert lines["audit-202"]["model"] == QUEUED_MODEL and lines["audit-202"]["job_id"] == job_id
    assert lines["audit-202"]["bytes_in"] == len(body) and lines["audit-202"]["bytes_out"] == len(accepted.content)
    assert lines["audit-get"]["route"] == "/v1/forecasts/{job_id}" and lines["audit-get"]["job_id"] == job_id
    assert lines["audit-delete"]["method"] == "DELETE" and lines["audit-delete"]["job_id"] == job_id
    assert lines["audit-401"]["key_id"] is None and lines["audit-401"]["status"] == 401
    text = scoped.audit.read_text()
    for secret in (API_KEY, READER, "wrong-secret-key", str(MARK)):
        assert secret not in text


def test_the_audit_log_goes_to_stdout_by_default_and_off_writes_none(redis_server, capfd):
    for target, expected in (("-", 1), ("off", 0)):
        with TestClient(create_app(settings_for(redis_server, audit_log=target))) as client:
            capfd.readouterr()
            client.get("/v1/models", headers={"X-API-Key": API_KEY, "X-Request-Id": f"stdout-{target}"})
            out = capfd.readouterr().out

        lines = [json.loads(line) for line in out.splitlines() if f'"stdout-{target}"' in line]
        assert len(lines) == expected
        assert all(line["route"] == "/v1/models" and line["key_id"] == key_id(API_KEY) for line in lines)


@pytest.mark.parametrize(
    ("entry", "key", "grant"),
    [
        ("plain-key", "plain-key", Grant()),
        ("a key with spaces", "a key with spaces", Grant()),  # a whole line was one key before options
        ("base64key== models=chronos-bolt-*,amazon/chronos-2 scopes=read",
         "base64key==", Grant(frozenset({READ}), ("chronos-bolt-*", "amazon/chronos-2"))),
        ("k scopes=forecast", "k", Grant(frozenset({FORECAST}), None)),
    ],
)  # fmt: skip
def test_key_file_lines_are_a_key_then_options_and_old_lines_keep_full_access(entry, key, grant):
    assert parse_entry(entry) == (key, grant)


def test_a_plain_key_may_forecast_and_read_every_model_but_is_no_admin():
    _, grant = parse_entry("plain-key")

    assert grant.scopes == {FORECAST, READ} and grant.models is None and not grant.admin


def test_a_key_file_with_an_unknown_scope_or_one_key_granted_twice_stops_the_start():
    with pytest.raises(ValueError, match="unknown scope"):
        KeyRing(["k scopes=write"])
    with pytest.raises(ValueError, match="configured twice"):
        KeyRing(["k scopes=read", "k scopes=admin"])
    assert KeyRing(["k", "k"]).owner("k") == key_id("k")
