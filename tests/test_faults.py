"""Faults: the API while Redis is away; a worker killed mid-job; a worker told to stop."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
import types

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared import catalog
from shared.store import keys

from conftest import (
    API_KEY, BOLT, forecast_body, free_port, settings_for, spawn_worker, start_redis, start_worker, wait_for,
)

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


MODEL = "amazon/chronos-bolt-small"  # served by no session worker: these tests start and stop their own


@pytest.fixture(scope="module")
def small_checkpoint(synthetic_dir):
    from shared import catalog
    from workers import synthetic

    spec = catalog.get(MODEL)
    if not (synthetic_dir / spec.slug).exists():
        synthetic.build(spec, synthetic_dir / spec.slug, seed=0)
    return synthetic_dir


def running(api, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (job := api.get(f"/v1/forecasts/{job_id}").json())["status"] == "queued":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def test_a_worker_killed_mid_job_has_the_job_run_again_elsewhere_to_completion(
    api, redis_server, small_checkpoint, tmp_path
):
    victim = start_worker(redis_server, small_checkpoint, MODEL, tmp_path, MAX_BATCH="16", WORKER_SLOTS="4")
    job = api.post("/v1/forecasts", json=forecast_body(MODEL, n_series=300, length=400)).json()
    claimed = running(api, job["id"])
    os.killpg(victim.process.pid, signal.SIGKILL)  # the whole worker, mid-job: no ack, no result
    victim.process.wait(10)

    rescuer = start_worker(redis_server, small_checkpoint, MODEL, tmp_path, MAX_BATCH="16", WORKER_SLOTS="4")
    try:
        done = wait_for(api, job["id"], timeout=120)
    finally:
        rescuer.stop()

    assert claimed["status"] == "running" and done["status"] == "succeeded", done
    assert done["attempts"] == 2 and len(done["predictions"]) == 300
    worker = redis_server.client().hget(f"cq:job:{job['id']}", "worker")
    assert worker.split("/")[0] != "" and str(victim.process.pid) not in worker
    assert "restored 1 job(s)" in rescuer.tail(200)


def test_a_duplicate_message_of_a_running_job_restarts_it_and_it_ends_with_one_runs_results(
    api, redis_server, small_checkpoint, tmp_path
):
    from shared import catalog
    from shared.celery_app import make_celery, send_jobs
    from shared.store import Lane

    # A duplicate comes from a sweep that took a message in flight for lost, or a holder taken for
    # dead while it still runs (workers/reaper.py): its claim takes the running job back.
    worker = start_worker(redis_server, small_checkpoint, MODEL, tmp_path, MAX_BATCH="16", WORKER_SLOTS="4")
    try:
        # Series of their own: another test's identical job would answer this one from the result cache.
        job = api.post("/v1/forecasts", json=forecast_body(MODEL, n_series=300, length=397)).json()
        deadline = time.monotonic() + 60
        while (view := api.get(f"/v1/forecasts/{job['id']}").json())["progress"]["done"] < 32:
            assert view["status"] in ("queued", "running") and time.monotonic() < deadline, view
            time.sleep(0.02)
        send_jobs(make_celery(settings_for(redis_server)), catalog.get(MODEL), Lane.ASYNC, [job["id"]])
        done = wait_for(api, job["id"], timeout=120)
        logged = worker.tail(400)
    finally:
        worker.stop()

    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert [p["item_id"] for p in done["predictions"]] == [f"s{i}" for i in range(300)]
    assert f"{job['id']}: superseded" in logged  # the first run went on, and stored nothing more


def test_sigterm_lets_a_worker_finish_the_job_in_hand_before_it_exits(api, redis_server, small_checkpoint, tmp_path):
    worker = start_worker(redis_server, small_checkpoint, MODEL, tmp_path, MAX_BATCH="16", WORKER_SLOTS="4")
    job = api.post("/v1/forecasts", json=forecast_body(MODEL, n_series=200, length=400)).json()
    running(api, job["id"])

    worker.process.send_signal(signal.SIGTERM)
    exit_code = worker.process.wait(120)
    done = api.get(f"/v1/forecasts/{job['id']}").json()

    assert exit_code == 0
    assert done["status"] == "succeeded" and done["attempts"] == 1 and len(done["predictions"]) == 200


def test_a_job_whose_message_was_lost_in_transit_is_sent_again_and_its_series_are_kept(api, redis_server):
    import redis

    from shared import catalog
    from shared.celery_app import make_celery
    from shared.series import decode
    from shared.store import JobStore, keys
    from workers.reaper import resend_lost

    spec = catalog.get("amazon/chronos-bolt-mini")  # no worker: its messages stay in the queue
    body = forecast_body(spec.id, n_series=2)
    job_id = api.post("/v1/forecasts", json=body).json()["id"]
    client = redis_server.client()
    # What kombu's pop-then-record window does to a worker killed in between: the message is gone.
    (lost,) = [m for m in client.lrange(keys.queue(spec), 0, -1) if job_id in m]
    client.lrem(keys.queue(spec), 1, lost)
    client.delete(keys.sweep_lock(spec))
    time.sleep(0.05)

    store = JobStore(redis.Redis.from_url(redis_server.url), settings_for(redis_server))
    resent = resend_lost(make_celery(settings_for(redis_server), serve=spec), store, spec, grace_s=0.01)

    assert resent == 1
    (again,) = [m for m in client.lrange(keys.queue(spec), 0, -1) if job_id in m]
    envelope = json.loads(again)
    args = json.loads(base64.b64decode(envelope["body"]))[0]
    assert envelope["headers"]["id"] == job_id and args == [job_id]  # the message carries no series
    stored = decode(redis.Redis.from_url(redis_server.url).lindex(keys.job_input(job_id), 1))
    assert stored.target[0].tolist() == pytest.approx(body["inputs"][1]["target"])  # the series as accepted
    assert api.get(f"/v1/forecasts/{job_id}").json()["status"] == "queued"
    api.delete(f"/v1/forecasts/{job_id}")
    assert not client.exists(keys.job_input(job_id))  # the series go when the job ends


def test_a_message_between_kombus_pop_and_its_unacked_record_is_not_taken_for_lost(api, redis_server, monkeypatch):
    import redis

    from shared import catalog
    from shared.celery_app import make_celery
    from shared.store import JobStore, keys
    from workers import reaper

    spec = catalog.get("amazon/chronos-bolt-mini")  # no worker: its messages stay in the queue
    job_id = api.post("/v1/forecasts", json=forecast_body(spec.id)).json()["id"]
    client = redis_server.client()
    (popped,) = [m for m in client.lrange(keys.queue(spec), 0, -1) if job_id in m]
    client.lrem(keys.queue(spec), 1, popped)  # a live worker's kombu popped it ...
    client.delete(keys.sweep_lock(spec))
    tag = f"tag-{job_id}"

    def recorded(_seconds: float) -> None:  # ... and records it in `unacked` while the sweep looks
        client.hset(keys.KOMBU_UNACKED, tag, json.dumps([json.loads(popped), "", keys.queue(spec)]))

    time.sleep(0.05)  # the job is older than the grace period
    # The sweep's wait between its two looks, in the reaper's module only.
    monkeypatch.setattr(reaper, "time", types.SimpleNamespace(sleep=recorded, time=time.time))
    store = JobStore(redis.Redis.from_url(redis_server.url), settings_for(redis_server))
    try:
        resent = reaper.resend_lost(make_celery(settings_for(redis_server), serve=spec), store, spec, grace_s=0.01)
        queued = [m for m in client.lrange(keys.queue(spec), 0, -1) if job_id in m]
    finally:
        client.hdel(keys.KOMBU_UNACKED, tag)
        api.delete(f"/v1/forecasts/{job_id}")

    assert resent == 0 and queued == []  # no second message: the one in `unacked` is the job's
    assert client.hget(keys.job(job_id), "status") == "cancelled"  # cancelled from `queued`: never claimed


def handed_to_a_dead_worker(api, redis_server, spec, handed_out: float, length: int = 64) -> str:
    """A job whose message is what kombu leaves behind for a worker killed after fetching but before
    claiming: recorded as handed out (unacked, at `handed_out`), the job still queued."""
    job_id = api.post("/v1/forecasts", json=forecast_body(spec.id, length=length)).json()["id"]
    client = redis_server.client()
    (raw,) = [m for m in client.lrange(keys.queue(spec), 0, -1) if job_id in m]
    client.lrem(keys.queue(spec), 1, raw)
    client.hset(keys.KOMBU_UNACKED, "tag-of-a-dead-worker", json.dumps([json.loads(raw), "", keys.queue(spec)]))
    client.zadd(keys.KOMBU_UNACKED_INDEX, {"tag-of-a-dead-worker": handed_out})
    return job_id


def test_a_message_handed_to_a_worker_that_died_before_claiming_its_job_goes_back_to_the_queue(api, redis_server):
    import redis

    from shared.celery_app import make_celery
    from shared.store import JobStore
    from workers.reaper import restore

    spec = catalog.get("amazon/chronos-bolt-mini")
    client = redis_server.client()
    job_id = handed_to_a_dead_worker(api, redis_server, spec, time.time() - 60)

    store = JobStore(redis.Redis.from_url(redis_server.url), settings_for(redis_server, heartbeat_s=1))
    restored = restore(make_celery(settings_for(redis_server), serve=spec), store, spec)

    assert restored == 1
    assert any(job_id in m for m in client.lrange(keys.queue(spec), 0, -1))
    assert client.hget(keys.KOMBU_UNACKED, "tag-of-a-dead-worker") is None
    api.delete(f"/v1/forecasts/{job_id}")


def test_the_reaper_reads_only_messages_handed_out_before_the_last_heartbeat(api, redis_server):
    """A worker is taken for dead 3 heartbeats after its last: a message handed out since the last
    heartbeat cannot be an orphan yet, and under load `unacked` holds every worker's messages."""
    import redis

    from shared.celery_app import make_celery
    from shared.store import JobStore
    from workers.reaper import restore

    spec = catalog.get("amazon/chronos-bolt-mini")
    client = redis_server.client()
    # A body no other test sends: a later identical request would join this job (single flight).
    job_id = handed_to_a_dead_worker(api, redis_server, spec, time.time() - 2, length=47)
    # Claimed by a worker that is not live: an orphan by its state, which the reaper restored
    # whatever its age before; now only once its message is older than a heartbeat.
    client.hset(keys.job(job_id), mapping={"status": "running", "worker": "gone-worker/1"})
    store = JobStore(redis.Redis.from_url(redis_server.url), settings_for(redis_server, heartbeat_s=5))
    app = make_celery(settings_for(redis_server), serve=spec)
    try:
        assert store.unacked(handed_out_before=time.time() - 5) == {}
        assert restore(app, store, spec) == 0  # not looked at: handed out 2 s ago
        assert client.hget(keys.KOMBU_UNACKED, "tag-of-a-dead-worker") is not None
        client.zadd(keys.KOMBU_UNACKED_INDEX, {"tag-of-a-dead-worker": time.time() - 6})
        assert restore(app, store, spec) == 1  # a heartbeat old: given back
        assert any(job_id in m for m in client.lrange(keys.queue(spec), 0, -1))
    finally:
        client.hdel(keys.KOMBU_UNACKED, "tag-of-a-dead-worker")
        client.zrem(keys.KOMBU_UNACKED_INDEX, "tag-of-a-dead-worker")
        client.hset(keys.job(job_id), "status", "queued")  # no worker will run it: cancelled at once
        api.delete(f"/v1/forecasts/{job_id}")
        assert client.hget(keys.job(job_id), "status") == "cancelled"


def test_every_job_answered_202_ends_after_redis_restarts_with_its_append_only_file(
    redis_server, synthetic_dir, tmp_path
):
    """Redis as compose runs it (AOF on) is restarted with jobs queued and running: none is lost."""
    from conftest import BOLT

    store = start_redis(tmp_path / "aof", "--appendonly", "yes", "--appendfsync", "everysec")
    worker = start_worker(store, synthetic_dir, BOLT, tmp_path, MAX_BATCH="8")
    try:
        with TestClient(create_app(settings_for(store)), headers={"X-API-Key": API_KEY}) as api:
            # 30 different requests: identical ones in flight would share one job (single-flight, api/service.py).
            accepted = [api.post("/v1/forecasts", json=forecast_body(BOLT, n_series=8, length=300 + i)).json()["id"]
                        for i in range(30)]  # fmt: skip
            store.process.terminate()  # SIGTERM: Redis writes its append-only file and exits
            store.process.wait(30)
            store = start_redis(tmp_path / "aof", "--appendonly", "yes", port=store.port)
            statuses = [wait_for(api, job_id, timeout=120)["status"] for job_id in accepted]
    finally:
        worker.stop()
        store.process.terminate()
        store.process.wait(10)

    assert statuses == ["succeeded"] * 30


def test_bystanders_of_a_job_that_kills_its_worker_three_times_succeed_and_it_fails(
    api, redis_server, small_checkpoint, tmp_path
):
    from conftest import OTHER_KEY

    client = redis_server.client()
    culprit = api.post("/v1/forecasts", json=forecast_body(MODEL, n_series=2000, length=400)).json()["id"]
    other = {"X-API-Key": OTHER_KEY}
    bystanders = [api.post("/v1/forecasts", json=forecast_body(MODEL, length=40 + k), headers=other).json()["id"]
                  for k in range(5)]  # fmt: skip
    for _ in range(3):  # each time, the worker dies while the culprit's series are in a forward pass
        worker = start_worker(redis_server, small_checkpoint, MODEL, tmp_path, MAX_BATCH="16", WORKER_SLOTS="4")
        deadline = time.monotonic() + 60
        while True:  # claimed by this worker (not a mark left by the last one), and in a pass
            holder, in_pass = client.hmget(f"cq:job:{culprit}", "worker", "in_pass")
            if holder and f"/{worker.process.pid}" in holder and in_pass is not None:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)
    last = start_worker(redis_server, small_checkpoint, MODEL, tmp_path, MAX_BATCH="16", WORKER_SLOTS="4")
    try:
        with TestClient(api.app, headers=other) as as_other:
            ended = [wait_for(as_other, job_id, timeout=120) for job_id in bystanders]
        failed = wait_for(api, culprit, timeout=120)
    finally:
        last.stop()

    assert [job["status"] for job in ended] == ["succeeded"] * 5
    assert failed["status"] == "failed" and "lost 3 times while it was in a forward pass" in failed["error"]


def test_a_worker_that_cannot_start_exits_saying_why_and_is_never_listed(redis_server, synthetic_dir, tmp_path):
    """Celery logs a worker_init handler's error and carries on: the worker took jobs it could not
    run and never came online (its metrics port taken, in one CI run). It must exit, so that its
    supervisor starts it again, and say why."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    port = taken.getsockname()[1]
    registry = keys.workers(catalog.get(BOLT))
    before = set(redis_server.client().hkeys(registry))
    worker = spawn_worker(redis_server, synthetic_dir, BOLT, tmp_path, METRICS_PORT=str(port))
    try:
        assert worker.process.wait(90) == 1, worker.tail()
    finally:
        worker.stop()
        taken.close()
    log = worker.log.read_text(errors="replace")
    assert "the worker could not start" in log and f"the metrics port (METRICS_PORT) {port}" in log, worker.tail()
    assert "ready." not in log  # Celery's consumer never started: no job was taken
    assert set(redis_server.client().hkeys(registry)) == before


def test_a_worker_judges_others_alive_or_dead_only_some_beats_after_its_own_came_back():
    """After a Redis outage every worker's last beat is old: the first back (or one started then)
    must not take the others for dead (and run their jobs again) before they have had the time to
    beat again."""
    from workers.reaper import STEADY_BEATS, Steady

    steady = Steady()
    start = [steady.beat(True) for _ in range(STEADY_BEATS)]  # it may have started just after an outage
    outage = [steady.beat(ok) for ok in (False, False)]
    back = [steady.beat(True) for _ in range(STEADY_BEATS + 1)]

    assert start == [False] * (STEADY_BEATS - 1) + [True] and outage == [False, False]
    assert back == [False] * (STEADY_BEATS - 1) + [True, True] and STEADY_BEATS >= 3
