"""Give a dead worker's jobs back to the queue now, not after the visibility timeout.

With Redis, Celery (kombu) keeps every message a worker holds in an `unacked` hash until the
worker acks it, and puts it back on its queue once it is older than the visibility timeout
(MAX_JOB_S + 600 s, so that long jobs never run twice). A worker killed mid-job would leave
its jobs waiting that long. Every worker therefore looks, each heartbeat, for messages of its
own model whose job is held by a worker that has stopped heartbeating, and restores them
through kombu's own `restore_by_tag` (the same transaction kombu runs for expired messages).
The next delivery claims the job again (`attempts` + 1); after `MAX_DELIVERIES` it fails.
"""

from __future__ import annotations

import json
import logging
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
    """Delivery tags of unacked messages for this model whose job's worker is no longer alive."""
    queues = set(keys.worker_queues(spec))
    held = []
    for tag, raw in client.hgetall("unacked").items():  # kombu's key for messages handed out, not acked
        message, _exchange, routing_key = json.loads(raw)
        if routing_key in queues:
            held.append((tag, message["headers"]["id"]))  # Celery's task id is the job id
    if not held:
        return []
    alive = live_workers(client, spec, heartbeat_s)
    with client.pipeline(transaction=False) as pipe:
        for _, job_id in held:
            pipe.hmget(keys.job(job_id), "status", "worker")
        records = pipe.execute()
    # Only jobs claimed by a worker that stopped heartbeating: a message not yet claimed may be
    # in a live worker's hands between fetch and claim.
    return [tag for (tag, _), (status, worker) in zip(held, records, strict=True)
            if status == "running" and worker and worker not in alive]  # fmt: skip


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
