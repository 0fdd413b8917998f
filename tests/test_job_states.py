"""The job state machine's transitions, run as the Lua scripts against a real Redis."""

from __future__ import annotations

import time
import uuid

import pytest

from shared import keys
from shared.jobs import JobRecord, JobStatus, Lane, Scripts, finish_args, new_record


@pytest.fixture()
def client(redis_server):
    return redis_server.client()


@pytest.fixture()
def scripts(client):
    return Scripts(client)


def queued_job(client) -> str:
    job_id = uuid.uuid4().hex
    client.hset(
        keys.job(job_id), mapping=new_record(job_id, "amazon/chronos-bolt-tiny", 1, 4, Lane.ASYNC, time.time(), "owner")
    )
    return job_id


def start(scripts, job_id):
    return scripts.start(
        keys=[keys.job(job_id), keys.in_flight("owner"), "cq:queued:test", keys.job_input(job_id), keys.job_output(job_id)],
        args=[repr(time.time()), "w1", 3, 60, keys.EVENTS_CHANNEL, job_id],
    )


def finish(scripts, job_id, status=JobStatus.SUCCEEDED, **fields):
    args = finish_args(status, time.time(), 60, keys.EVENTS_CHANNEL, job_id, fields)
    return scripts.finish(
        keys=[keys.job(job_id), keys.in_flight("owner"), keys.job_input(job_id), keys.job_output(job_id),
              keys.job_items(job_id)],
        args=args,
    )  # fmt: skip


def cancel(scripts, job_id, owner="owner"):
    return scripts.cancel(
        keys=[keys.job(job_id), keys.in_flight(owner), keys.job_input(job_id), keys.job_output(job_id)],
        args=[repr(time.time()), 60, keys.EVENTS_CHANNEL, job_id, owner],
    )


def record(client, job_id) -> JobRecord:
    return JobRecord.from_hash(client.hgetall(keys.job(job_id)))


def test_queued_job_runs_then_succeeds_with_its_result_and_a_ttl(client, scripts):
    job_id = queued_job(client)
    assert start(scripts, job_id) == "running"
    assert finish(scripts, job_id, inference_s=0.5, weights="real") == "succeeded"
    rec = record(client, job_id)
    assert rec.status is JobStatus.SUCCEEDED and rec.attempts == 1
    assert rec.inference_s == 0.5 and rec.weights == "real"
    assert 0 < client.ttl(keys.job(job_id)) <= 60


def test_terminal_state_is_announced_on_the_events_channel(client, scripts):
    job_id = queued_job(client)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.EVENTS_CHANNEL)
    start(scripts, job_id)
    finish(scripts, job_id)
    deadline = time.monotonic() + 5
    message = None
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)  # None for the (ignored) subscribe confirmation
    assert message is not None and message["data"] == job_id


def test_first_terminal_write_wins_over_a_redelivered_duplicate(client, scripts):
    job_id = queued_job(client)
    start(scripts, job_id)
    finish(scripts, job_id, inference_s=1.0)
    assert start(scripts, job_id) == "succeeded"  # the redelivery is told to drop the message
    assert finish(scripts, job_id, inference_s=2.0) == "succeeded"
    assert record(client, job_id).inference_s == 1.0


def test_redelivery_of_a_running_job_counts_another_attempt(client, scripts):
    job_id = queued_job(client)
    start(scripts, job_id)
    assert start(scripts, job_id) == "running"
    assert record(client, job_id).attempts == 2


def test_cancelling_a_queued_job_ends_it_and_its_message_is_dropped(client, scripts):
    job_id = queued_job(client)
    assert cancel(scripts, job_id) == "cancelled"
    assert start(scripts, job_id) == "cancelled"
    rec = record(client, job_id)
    assert rec.status is JobStatus.CANCELLED and rec.attempts == 0


def test_cancelling_a_running_job_turns_its_finish_into_cancelled_without_a_result(client, scripts):
    job_id = queued_job(client)
    start(scripts, job_id)
    assert cancel(scripts, job_id) == "cancelling"
    assert finish(scripts, job_id, inference_s=1.0) == "cancelled"
    rec = record(client, job_id)
    assert rec.status is JobStatus.CANCELLED and rec.inference_s is None


def test_cancelling_a_finished_job_changes_nothing(client, scripts):
    job_id = queued_job(client)
    start(scripts, job_id)
    finish(scripts, job_id, JobStatus.FAILED, error="boom")
    assert cancel(scripts, job_id) == "failed"
    assert record(client, job_id).error == "boom"


def test_a_vanished_record_is_reported_missing(client, scripts):
    assert start(scripts, "nope") == "missing"
    assert finish(scripts, "nope") == "missing"
    assert cancel(scripts, "nope") == "missing"


def test_a_job_whose_worker_keeps_dying_fails_after_max_deliveries_instead_of_looping(client, scripts):
    job_id = queued_job(client)

    claims = []
    for _ in range(4):  # each claim, then a forward pass that its worker never finishes: it died
        claims.append(start(scripts, job_id))
        client.hset(keys.job(job_id), "in_pass", "1")

    assert claims == ["running", "running", "running", "failed"]
    rec = record(client, job_id)
    assert rec.status is JobStatus.FAILED and rec.attempts == 3
    assert "lost 3 times while it was in a forward pass" in rec.error and rec.finished_at is not None


def test_a_job_that_was_only_waiting_when_its_worker_died_is_never_failed_for_it(client, scripts):
    job_id = queued_job(client)

    claims = [start(scripts, job_id) for _ in range(5)]  # each worker died before the job reached a pass

    assert claims == ["running"] * 5
    assert record(client, job_id).status is JobStatus.RUNNING
