"""Completion callbacks: signed POSTs to allowed URLs, retried with backoff, never lost."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from client import verify_signature

from conftest import API_KEY, BOLT, OTHER_KEY, forecast_body, settings_for, wait_for


class Receiver:
    """An HTTP endpoint on a free port that records what it is sent and fails the first `failures` POSTs."""

    def __init__(self, failures: int = 0):
        self.failures, self.calls = failures, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append((self.path, dict(self.headers), body))
                self.send_response(503 if len(receiver.calls) <= receiver.failures else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.close()


def app_for(redis_server, receiver, **overrides) -> TestClient:
    settings = settings_for(redis_server, heartbeat_s=1, callback_allowed_urls=f"{receiver.base}/hooks/",
                            callback_backoff_s=0.1, **overrides)  # fmt: skip
    return TestClient(create_app(settings), headers={"X-API-Key": API_KEY})


def settle(api, job_id: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = api.get(f"/v1/forecasts/{job_id}").json()
        if view["callback"]["status"] != "pending" or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


def test_a_finished_job_posts_its_status_signed_with_the_keys_secret(redis_server, workers, receiver):
    with app_for(redis_server, receiver) as api:
        body = {**forecast_body(BOLT, length=33, horizon=2), "callback_url": f"{receiver.base}/hooks/done?x=1"}
        job = api.post("/v1/forecasts", json=body).json()
        assert job["callback"] == {"url": body["callback_url"], "status": "pending", "attempts": 0, "error": None}
        wait_for(api, job["id"])
        view = settle(api, job["id"])
        secret = api.get("/v1/callbacks/secret").json()["secret"]
        other_secret = api.get("/v1/callbacks/secret", headers={"X-API-Key": OTHER_KEY}).json()["secret"]

    assert view["callback"] == {"url": body["callback_url"], "status": "delivered", "attempts": 1, "error": None}
    ((path, headers, raw),) = receiver.calls
    assert path == "/hooks/done?x=1"
    sent = json.loads(raw)
    assert sent["id"] == job["id"] and sent["status"] == "succeeded" and sent["url"] == f"/v1/forecasts/{job['id']}"
    assert "predictions" not in sent  # results are read with the API key, never pushed
    assert headers["X-Chronos-Job-Id"] == job["id"] and headers["X-Chronos-Event"] == "job.succeeded"
    assert verify_signature(secret, headers["X-Chronos-Signature"], raw)
    assert not verify_signature(other_secret, headers["X-Chronos-Signature"], raw)
    assert not verify_signature(secret, headers["X-Chronos-Signature"], raw + b" ")
    assert not verify_signature(secret, headers["X-Chronos-Signature"], raw, now=time.time() + 3600)


def test_a_failing_endpoint_is_retried_with_backoff_until_it_answers(redis_server, workers):
    receiver = Receiver(failures=2)
    try:
        with app_for(redis_server, receiver) as api:
            body = {**forecast_body(BOLT, length=34, horizon=2), "callback_url": f"{receiver.base}/hooks/"}
            job = api.post("/v1/forecasts", json=body).json()
            view = settle(api, job["id"])
    finally:
        receiver.close()

    assert view["callback"]["status"] == "delivered" and view["callback"]["attempts"] == 3
    assert len(receiver.calls) == 3


def test_after_the_last_attempt_the_callback_is_failed_with_its_error(redis_server, workers):
    receiver = Receiver(failures=100)
    try:
        with app_for(redis_server, receiver, callback_max_attempts=2) as api:
            body = {**forecast_body(BOLT, length=35, horizon=2), "callback_url": f"{receiver.base}/hooks/"}
            view = settle(api, api.post("/v1/forecasts", json=body).json()["id"])
            time.sleep(0.5)
    finally:
        receiver.close()

    assert view["callback"] == {"url": body["callback_url"], "status": "failed", "attempts": 2, "error": "HTTP 503"}
    assert len(receiver.calls) == 2


def test_a_job_cancelled_while_queued_calls_back_too(redis_server, receiver):
    with app_for(redis_server, receiver) as api:
        # No worker serves bolt-base in this session: the job stays queued until cancelled.
        body = {**forecast_body("amazon/chronos-bolt-base"), "callback_url": f"{receiver.base}/hooks/"}
        job = api.post("/v1/forecasts", json=body).json()
        api.delete(f"/v1/forecasts/{job['id']}")
        view = settle(api, job["id"])

    assert view["callback"]["status"] == "delivered"
    assert json.loads(receiver.calls[0][2])["status"] == "cancelled"


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:1/hooks/", "ftp://x/hooks/", "http://u:p@{host}/hooks/",
     "{base}/other/", "{base}.evil.example/hooks/", "{base}/hooks/../admin", "{base}/hooksevil",
     "{base}/hooks/%2e%2e/admin"],
    ids=["metadata", "other-port", "scheme", "credentials", "other-path", "suffix-host", "dot-segments",
         "no-segment-boundary", "encoded-dot-segments"],
)  # fmt: skip
def test_callback_urls_outside_the_allowed_prefixes_are_422_and_queue_nothing(redis_server, receiver, url):
    url = url.format(base=receiver.base, host=receiver.base.removeprefix("http://"))
    client = redis_server.client()
    before = set(client.scan_iter("cq:job:*"))
    with app_for(redis_server, receiver) as api:
        answer = api.post("/v1/forecasts", json={**forecast_body(BOLT), "callback_url": url})

    assert answer.status_code == 422 and answer.json()["code"] == "callback-not-allowed"
    assert answer.json()["field"] == "callback_url"
    assert set(client.scan_iter("cq:job:*")) == before


def test_without_allowed_prefixes_every_callback_url_is_refused(api):
    answer = api.post("/v1/forecasts", json={**forecast_body(BOLT), "callback_url": "https://example.com/hook"})

    assert answer.status_code == 422 and "CALLBACK_ALLOWED_URLS" in answer.json()["detail"]
