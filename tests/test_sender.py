"""Async jobs that reach an API process together go to their queue as one message (api/sender.py)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from shared import catalog
from shared.celery_app import job_ids, make_celery
from shared.store import JobStore, keys
from workers.reaper import resend_lost

from conftest import API_KEY, BOLT, forecast_body, job_keys, settings_for, wait_for

pytestmark = pytest.mark.integration

IDLE = catalog.get("amazon/chronos-bolt-mini")  # served by no worker: its messages stay in the queue
# Each test sends series of its own lengths: identical requests in flight would share one job.


def submit_together(api: TestClient, bodies: list[dict]) -> list:
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: api.post("/v1/forecasts", json=body), bodies))
    api.submitted += [a.json()["id"] for a in answers if a.status_code == 202]
    return answers


def queued_messages(client: redis.Redis) -> list[list[str]]:
    return [job_ids(json.loads(m)) for m in client.lrange(keys.queue(IDLE), 0, -1)]


@pytest.fixture()
def api(redis_server):
    app = create_app(settings_for(redis_server, heartbeat_s=1, send_window_ms=500, send_max_jobs=4))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        client.submitted = []
        yield client
        for job_id in client.submitted:  # other tests' sweeps must not find these queued without a message
            client.delete(f"/v1/forecasts/{job_id}")


def test_async_jobs_sent_together_share_one_message_and_each_keeps_its_own_record(api, redis_server):
    client = redis_server.client()
    client.delete(keys.queue(IDLE))

    answers = submit_together(api, [forecast_body(IDLE.id, n_series=1, length=20 + i) for i in range(3)])
    ids = [a.json()["id"] for a in answers]
    cancelled = api.delete(f"/v1/forecasts/{ids[0]}")

    assert [a.status_code for a in answers] == [202, 202, 202] and len(set(ids)) == 3
    assert [sorted(m) for m in queued_messages(client)] == [sorted(ids)]
    assert cancelled.json()["status"] == "cancelled"
    assert [api.get(f"/v1/forecasts/{i}").json()["status"] for i in ids[1:]] == ["queued", "queued"]


def test_identical_jobs_created_together_share_one_job_and_its_message_names_it_once(api, redis_server):
    # Both creates are held with the message and run in one pipeline: the second attaches to the
    # first's job (single-flight), and the message names only the job created.
    client = redis_server.client()
    client.delete(keys.queue(IDLE))
    body = forecast_body(IDLE.id, n_series=1, length=250)

    answers = submit_together(api, [body, body])

    assert [a.status_code for a in answers] == [202, 202]
    assert answers[0].json()["id"] == answers[1].json()["id"]
    assert queued_messages(client) == [[answers[0].json()["id"]]]


def test_a_message_holds_at_most_send_max_jobs(api, redis_server):
    client = redis_server.client()
    client.delete(keys.queue(IDLE))

    answers = submit_together(api, [forecast_body(IDLE.id, length=200 + i) for i in range(6)])

    assert [a.status_code for a in answers] == [202] * 6
    assert sorted(len(m) for m in queued_messages(client)) == [2, 4]


def test_when_a_shared_message_cannot_be_sent_every_job_in_it_is_refused_and_none_waits(
    api, redis_server, monkeypatch
):
    from api import sender

    async def broker_down(*args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(sender, "publish", broker_down)
    client = redis_server.client()
    before = job_keys(client)

    answers = submit_together(api, [forecast_body(IDLE.id, length=300 + i) for i in range(3)])

    assert [a.status_code for a in answers] == [503, 503, 503]
    assert {a.json()["code"] for a in answers} == {"broker-unavailable"}
    # Ended, not deleted (a caller that joined one may hold its id): failed, with the reason, no series.
    unsent = [client.hgetall(key) for key in job_keys(client) - before]
    assert len(unsent) == 3 and {r["status"] for r in unsent} == {"failed"}
    assert all("could not be enqueued" in r["error"] for r in unsent)
    assert not any(client.exists(keys.job_input(r["id"])) for r in unsent)
    assert not any(client.zscore(keys.in_flight(r["owner"]), r["id"]) for r in unsent)


def test_a_job_sent_alone_has_its_message_pushed_by_the_script_that_creates_it(api, redis_server, monkeypatch):
    from api import sender

    async def broker_down(*args, **kwargs):
        raise ConnectionError("the shared message's send must not be used")

    monkeypatch.setattr(sender, "publish", broker_down)
    client = redis_server.client()
    client.delete(keys.queue(IDLE))

    large = submit_together(api, [forecast_body(IDLE.id, n_series=sender.SHARED_MAX_SERIES + 1, length=31)])[0]
    refused = submit_together(api, [forecast_body(IDLE.id, n_series=1, length=32)])[0]  # a small one is held

    assert large.status_code == 202 and queued_messages(client) == [[large.json()["id"]]]
    assert refused.status_code == 503 and refused.json()["code"] == "broker-unavailable"


def test_a_request_that_joined_a_job_whose_message_then_could_not_be_sent_finds_it_failed(
    api, redis_server, monkeypatch
):
    import asyncio
    import threading

    from api import sender

    release = threading.Event()

    async def slow_broker_down(*args, **kwargs):
        await asyncio.to_thread(release.wait, 10)
        raise ConnectionError("broker down")

    monkeypatch.setattr(sender, "publish", slow_broker_down)
    body = forecast_body(IDLE.id, length=350)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(api.post, "/v1/forecasts", json=body)  # its send hangs, then fails
        time.sleep(0.2)
        # Identical, within the first's window: their creates run together and this one joins the
        # first's job, answered before the message is sent.
        joined = api.post("/v1/forecasts", json=body)
        release.set()
        refused = first.result(30)

    assert joined.status_code == 202 and refused.status_code == 503
    later = api.get(f"/v1/forecasts/{joined.json()['id']}").json()
    assert later["status"] == "failed" and "could not be enqueued" in later["error"]


def test_every_job_of_a_shared_message_runs_on_the_worker(api, workers):
    answers = submit_together(api, [forecast_body(BOLT, n_series=1 + i, length=40 + i) for i in range(3)])

    done = [wait_for(api, a.json()["id"]) for a in answers]

    assert [d["status"] for d in done] == ["succeeded"] * 3
    assert [len(d["predictions"]) for d in done] == [1, 2, 3]


def test_the_jobs_of_a_shared_message_lost_in_transit_are_sent_again_one_by_one(api, redis_server):
    client = redis_server.client()
    client.delete(keys.queue(IDLE))
    ids = {a.json()["id"] for a in submit_together(api, [forecast_body(IDLE.id, length=400 + i) for i in range(2)])}
    store = JobStore(redis.Redis.from_url(redis_server.url), settings_for(redis_server))
    celery = make_celery(settings_for(redis_server), serve=IDLE)
    time.sleep(0.05)

    def ours() -> list[list[str]]:
        return sorted(sorted(m) for m in queued_messages(client) if set(m) & ids)

    client.delete(keys.sweep_lock(IDLE))
    resend_lost(celery, store, IDLE, grace_s=0.01)  # also re-sends earlier tests' jobs, whose queue they emptied
    while_present = ours()
    client.delete(keys.queue(IDLE))  # what kombu's pop-then-record window does to a worker killed in between
    client.delete(keys.sweep_lock(IDLE))
    resend_lost(celery, store, IDLE, grace_s=0.01)

    assert while_present == [sorted(ids)]  # still in their shared message: not sent again
    assert ours() == sorted([i] for i in ids)
