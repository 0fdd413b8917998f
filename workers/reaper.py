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
queue nor `unacked` at two looks `SETTLE_S` apart (a live worker's message is in that window
only for a moment; a message carries only job ids, the series wait in the job's input list,
`keys.job_input`). A duplicate of a message whose job has ended is dropped at its claim. A
duplicate that arrives while the job runs on a live worker claims it again: START cannot tell a
dead holder from a slow one, so it takes a `running` job back (as the redelivery after a worker's
death needs) and the job starts over; the claim's `attempts` fences the earlier holder, whose later
results, marks and finish are not stored (lua/append.lua, lua/read_pass.lua, lua/finish.lua; a
fine-tuning run stops at its next step, workers/training.py).
"""

from __future__ import annotations

import json
import logging
import time
from typing import cast

from celery import Celery
from kombu.transport.redis import Channel as RedisChannel
from kombu.transport.redis import QoS as RedisQoS

from shared.catalog import ModelSpec
from shared.celery_app import job_ids, send_jobs
from shared.store import JobStore, Lane, keys

log = logging.getLogger(__name__)

# Heartbeats in a row a worker sends after a failed one before it judges other workers again: after
# a Redis outage every worker's last beat is old, and the first to reach Redis again would take all
# the others for dead and run their jobs again. Within three periods every live worker has beaten
# again (a worker counts as dead three periods after its last beat: `shared.store.live`).
STEADY_BEATS = 3


class Steady:
    """Whether this worker may look for dead workers now (`beat` after each heartbeat): only after
    `STEADY_BEATS` successful beats in a row, from its start (it may start during an outage, or
    just after one) and after any failed beat."""

    def __init__(self) -> None:
        self.beats = 0

    def beat(self, ok: bool) -> bool:
        self.beats = self.beats + 1 if ok else 0
        return self.beats >= STEADY_BEATS


def orphans(store: JobStore, spec: ModelSpec) -> list[str]:
    """Delivery tags of unacked messages for this model whose worker is gone."""
    queues = set(keys.model_queues(spec))
    held = []
    # A message handed out within the last heartbeat is not looked at: its worker was live then,
    # and is taken for dead only 3 heartbeats after its last one (the handing out's time and the
    # heartbeat's both come from that worker's clock), so at least 2 heartbeats after the handing
    # out when it beat on time. The heartbeat left over covers one that came late; a worker whose
    # heartbeats stalled before it died has its last messages given back a heartbeat later.
    for tag, raw in store.unacked(handed_out_before=time.time() - store.settings.heartbeat_s).items():
        message, _exchange, routing_key = json.loads(raw)
        if routing_key in queues or routing_key.startswith(keys.revision_queue(spec, "")):  # pinned jobs' queues
            held += [(tag, job_id) for job_id in job_ids(message)]
    if not held:
        return []
    alive = store.live_workers(spec, train=None)
    unclaimed_before = time.time() - 3 * store.settings.heartbeat_s
    orphaned: set[str] = set()
    for (tag, _), (status, worker, handed_out) in zip(held, store.holders(held), strict=True):
        # Claimed by a worker that stopped heartbeating; or handed out long ago and never claimed,
        # which happens only to a worker killed between fetching a message and claiming its jobs
        # (a live worker claims at once: it fetches only when a slot is free). One such job of a
        # message is enough: the redelivery skips the jobs that ended meanwhile.
        if (status == "running" and worker and worker not in alive) or (
            status == "queued" and handed_out is not None and handed_out < unclaimed_before
        ):
            orphaned.add(tag)
    return sorted(orphaned)


def restore(app: Celery, store: JobStore, spec: ModelSpec) -> int:
    """Put the orphaned messages back on their queues; returns how many."""
    tags = orphans(store, spec)
    if not tags:
        return 0
    with app.connection_for_write() as connection:
        # Workers consume from Redis (shared/celery_app.py): the channel is kombu's Redis channel,
        # whose QoS keeps the unacked messages.
        qos = cast(RedisQoS, cast(RedisChannel, connection.default_channel).qos)
        for tag in tags:
            qos.restore_by_tag(tag)
    log.warning("restored %d job(s) of %s whose worker stopped heartbeating", len(tags), spec.id)
    return len(tags)


# Above this many waiting messages the sweep waits for the backlog to shrink (it reads every message).
SCAN_MAX = 5_000
# How long a job found without a message waits for a second look before its message is sent again:
# kombu pops a message off its queue, then records it in `unacked` in a second step, and a message
# between the two is in neither for a moment, on a live worker that is about to claim its jobs.
SETTLE_S = 0.5


def resend_lost(app: Celery, store: JobStore, spec: ModelSpec, grace_s: float, settle_s: float = SETTLE_S) -> int:
    """Send again the model's jobs queued longer than `grace_s` whose message is nowhere, twice
    `settle_s` apart; returns how many.

    One worker of the model sweeps at a time (a lock that expires with the grace period).
    """
    stale = store.sweep(spec, grace_s)
    lost = _unsent(store, spec, stale) if stale else {}
    if lost:  # a message in kombu's pop-then-record step turns up in `unacked`, or its job is claimed
        time.sleep(settle_s)
        lost = _unsent(store, spec, list(lost))
    for job_id, (lane, queue) in lost.items():
        send_jobs(app, spec, lane, [job_id], queue)
        store.resent(spec, job_id)
    if lost:
        log.warning("sent %d job(s) of %s again: accepted, never claimed, message lost", len(lost), spec.id)
    return len(lost)


def _unsent(store: JobStore, spec: ModelSpec, candidates: list[str]) -> dict[str, tuple[Lane, str | None]]:
    """Of these jobs, those still queued whose message is in none of the model's queues and not in
    `unacked`, with the lane and queue their message goes to (none when too many messages wait)."""
    messages = store.waiting_messages(spec, SCAN_MAX)
    if messages is None:
        return {}
    present = {job_id for raw in messages for job_id in job_ids(_message(json.loads(raw)))}
    unsent = {}
    for job_id in candidates:
        status, lane, queue = store.queued_state(spec, job_id)
        if status is not None and job_id not in present:  # not claimed, finished or expired meanwhile
            unsent[job_id] = (lane, queue)
    return unsent


def _message(stored: dict | list) -> dict:
    """A message from a queue (as sent), or from kombu's unacked hash ([message, exchange, routing key])."""
    return stored[0] if isinstance(stored, list) else stored
