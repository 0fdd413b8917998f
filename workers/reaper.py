"""Give a dead worker's jobs back to the queue now, not after the visibility timeout.

With Redis, Celery (kombu) keeps every message a worker holds in an `unacked` hash until the
worker acks it, and puts it back on its queue once it is older than the visibility timeout
(MAX_JOB_S + 600 s, so that long jobs never run twice). A worker killed mid-job would leave
its jobs waiting that long. Every worker therefore looks, each heartbeat, for messages of its
own model whose job is held by a worker that has stopped heartbeating, and restores them
through kombu's own `restore_by_tag` (the same transaction kombu runs for expired messages).
The next delivery claims the job again (`attempts` + 1); after `MAX_DELIVERIES` it fails.

One window kombu leaves open: its Redis transport pops a message off the list and records it in
`unacked` in a second step, so a worker killed in between loses the message outright. For that,
`resend_lost` re-sends jobs still `queued` after `grace_s` whose message is in neither their
queue nor `unacked` (a message carries only the job id; the series wait in the job's input list,
`keys.job_input`). A duplicate it might send
is harmless: the first delivery claims the job, later ones find it running or finished.
"""

from __future__ import annotations

import json
import logging
import re
import time

import redis
from celery import Celery

from shared import keys
from shared.catalog import ModelSpec

log = logging.getLogger(__name__)


def live_workers(client: redis.Redis, spec: ModelSpec, heartbeat_s: float) -> set[str]:
    """Names of the model's workers heard from within three heartbeats (the API's rule too)."""
    now = time.time()
    return {
        name
        for name, info in client.hgetall(keys.workers(spec)).items()
        if now - json.loads(info)["last_seen"] < 3 * heartbeat_s
    }


def orphans(client: redis.Redis, spec: ModelSpec, heartbeat_s: float) -> list[str]:
    """Delivery tags of unacked messages for this model whose worker is gone."""
    queues = set(keys.worker_queues(spec))
    held = []
    for tag, raw in client.hgetall(keys.KOMBU_UNACKED).items():
        message, _exchange, routing_key = json.loads(raw)
        if routing_key in queues:
            held.append((tag, message["headers"]["id"]))  # Celery's task id is the job id
    if not held:
        return []
    alive = live_workers(client, spec, heartbeat_s)
    with client.pipeline(transaction=False) as pipe:
        for tag, job_id in held:
            pipe.hmget(keys.job(job_id), "status", "worker")
            pipe.zscore(keys.KOMBU_UNACKED_INDEX, tag)
        replies = pipe.execute()
    unclaimed_before = time.time() - 3 * heartbeat_s
    orphaned = []
    for (tag, _), (status, worker), handed_out in zip(held, replies[::2], replies[1::2], strict=True):
        # Claimed by a worker that stopped heartbeating; or handed out long ago and never claimed,
        # which happens only to a worker killed between fetching a message and claiming its job
        # (a live worker claims at once: it fetches only when a slot is free).
        if (status == "running" and worker and worker not in alive) or (
            status == "queued" and handed_out is not None and handed_out < unclaimed_before
        ):
            orphaned.append(tag)
    return orphaned


def restore(app: Celery, client: redis.Redis, spec: ModelSpec, heartbeat_s: float) -> int:
    """Put the orphaned messages back on their queues; returns how many."""
    tags = orphans(client, spec, heartbeat_s)
    if not tags:
        return 0
    with app.connection_for_write() as connection:
        qos = connection.default_channel.qos
        for tag in tags:
            qos.restore_by_tag(tag)
    log.warning("restored %d job(s) of %s whose worker stopped heartbeating", len(tags), spec.id)
    return len(tags)


# kombu's JSON puts Celery's headers (task id first) after the body; a task id is 32 hex digits here.
_TASK_ID = re.compile(r'"id": "([0-9a-f]{32})"')
# Above this many waiting messages the sweep waits for the backlog to shrink (it reads every message).
SCAN_MAX = 5_000


def resend_lost(app: Celery, client: redis.Redis, spec: ModelSpec, grace_s: float) -> int:
    """Send again the model's jobs queued longer than `grace_s` whose message is nowhere; returns how many.

    One worker of the model sweeps at a time (a lock that expires with the grace period).
    """
    if not client.set(keys.sweep_lock(spec), "1", nx=True, ex=max(1, int(grace_s))):
        return 0
    stale = client.zrangebyscore(keys.queued(spec), "-inf", time.time() - grace_s, start=0, num=200)
    if not stale:
        return 0
    queues = keys.worker_queues(spec)
    if sum(client.llen(q) for q in queues) > SCAN_MAX:
        return 0
    present = {m.group(1) for q in queues for raw in client.lrange(q, 0, -1) if (m := _TASK_ID.search(raw))}
    present |= {m.group(1) for raw in client.hvals(keys.KOMBU_UNACKED) if (m := _TASK_ID.search(raw))}
    resent = 0
    for job_id in stale:
        status, lane = client.hmget(keys.job(job_id), "status", "lane")
        if status != "queued" or not client.exists(keys.job_input(job_id)):
            client.zrem(keys.queued(spec), job_id)  # claimed, finished or expired meanwhile
            continue
        if job_id in present:
            continue
        queue = keys.sync_queue(spec) if lane == "sync" else keys.queue(spec)
        app.send_task(keys.FORECAST_TASK, args=[job_id], task_id=job_id, queue=queue)
        client.zadd(keys.queued(spec), {job_id: time.time()})  # another grace period before looking again
        resent += 1
    if resent:
        log.warning("sent %d job(s) of %s again: accepted, never claimed, message lost", resent, spec.id)
    return resent
