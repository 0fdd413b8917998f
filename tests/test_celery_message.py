"""The API builds its queue messages itself (shared/celery_app.py `task_message`, pushed from the event
loop): they must be what Celery's own `send_task` puts on the queue, or workers would not run them."""

from __future__ import annotations

import json

import pytest

from shared import catalog
from shared.celery_app import job_ids, make_celery, send_jobs, task_message
from shared.store import Lane, keys

from conftest import settings_for

SPEC = catalog.get("amazon/chronos-bolt-mini")  # served by no test worker: the messages stay queued

# Different on every send, or per sending process: ids, the sender's name, its reply queue.
PER_SEND = {("headers", "origin"), ("properties", "reply_to"), ("properties", "delivery_tag")}


def normalised(raw: bytes, task_id: str | None = None) -> dict:
    message = json.loads(raw)
    for part, name in PER_SEND:
        message[part][name] = "…"
    if task_id is not None:  # a message of several jobs has a task id of its own
        for part, name in (("headers", "id"), ("headers", "root_id"), ("properties", "correlation_id")):
            assert message[part][name] == task_id
            message[part][name] = "…"
    return message


@pytest.mark.parametrize("ids", [["a" * 32], ["b" * 32, "c" * 32, "d" * 32]])
@pytest.mark.parametrize("lane", [Lane.ASYNC, Lane.SYNC])
def test_a_message_built_here_is_the_message_celery_sends(redis_server, ids, lane):
    client = redis_server.client()
    queue = keys.lane_queue(SPEC, lane)
    client.delete(queue)

    send_jobs(make_celery(settings_for(redis_server)), SPEC, lane, ids)
    (celery_sent,) = client.lrange(queue, 0, -1)
    client.delete(queue)
    ours = task_message(ids, queue)

    several = len(ids) > 1
    sent = json.loads(celery_sent)
    assert normalised(ours, json.loads(ours)["headers"]["id"] if several else None) == normalised(
        celery_sent.encode(), sent["headers"]["id"] if several else None
    )
    assert job_ids(json.loads(ours)) == ids  # and the reaper reads its jobs back
