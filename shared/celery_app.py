"""The Celery configuration both sides use: the API to send, the workers to consume."""

from __future__ import annotations

import base64
import json
import uuid

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu import Exchange, Queue

from shared import broker, catalog
from shared.settings import Settings
from shared.store import Lane, keys

# The anonymous exchange routes by queue name alone. A named exchange depends on binding
# rows in Redis; if those vanish (Redis restarted without its data) kombu silently sends
# every message to a dead-letter list.
_DIRECT = Exchange("", type="direct")


def queues_for(spec: catalog.ModelSpec, revision: str | None = None, train: bool = False) -> list[Queue]:
    """A worker's queues, sync lane first (the order it polls them in); with `revision`, also the
    queue of the jobs pinned to that weights revision; with `train`, its fine-tuning queue alone."""
    return [_queue(name) for name in keys.worker_queues(spec, revision, train)]


def _queue(name: str) -> Queue:
    return Queue(name, _DIRECT, routing_key=name)


def make_celery(
    settings: Settings, serve: catalog.ModelSpec | None = None, revision: str | None = None, train: bool = False
) -> Celery:
    """A Celery app on the settings' Redis with the reliability defaults of docs/architecture.md, crash safety.

    A sender knows every model's queues; a worker (`serve=spec`) knows, and so consumes, only its
    model's, and those of the jobs pinned to its weights `revision` (with `train`: only its model's
    fine-tuning queue).
    """
    every = [_queue(name) for spec in catalog.CATALOG for name in keys.model_queues(spec)]
    app = Celery("chronos_queue", broker=settings.redis_url)
    app.conf.update(
        # kombu's Redis transport, but with one Redis client per channel (shared/broker.py; redis:// only).
        broker_transport=broker.transport_for(settings.redis_url),
        task_queues=queues_for(serve, revision, train) if serve else every,
        task_create_missing_queues=False,
        # Results live in our own job records, not in Celery's result backend.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # Ack after the job's result is stored: a worker that dies mid-job leaves its messages
        # unacked, and Redis delivers them again after the visibility timeout.
        task_acks_late=True,
        # Jobs record their own failures; a task that raises met an infrastructure failure (Redis
        # away for minutes): leave its message unacked so that it is delivered again.
        task_acks_on_failure_or_timeout=False,
        # A worker reserves one message per free thread slot (workers run the threads pool), so it
        # fetches again, sync lane first, each time jobs finish.
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Redis redelivers unacked messages after this: it must outlast the longest job.
            "visibility_timeout": settings.visibility_timeout_s,
            # Poll a worker's queues in the order given (sync lane first), not round-robin.
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        # Task events feed Flower's task view; each job costs three event messages through Redis.
        worker_send_task_events=settings.task_events,
        worker_hijack_root_logger=False,
    )
    return app


def send_jobs(app: Celery, spec: catalog.ModelSpec, lane: Lane, job_ids: list[str], queue: str | None = None) -> None:
    """Send one message for these jobs to their model's queue for `lane` (or to `queue`, a pinned
    revision's, which senders do not declare). A message carries only ids:
    one job's id is also its task id; several jobs (api/sender.py) go as a list under a task id of
    their own. The series wait in the job store. The reaper reads the ids back with `job_ids`."""
    single = len(job_ids) == 1
    app.send_task(
        keys.FORECAST_TASK,
        args=[job_ids[0] if single else job_ids],
        task_id=job_ids[0] if single else uuid.uuid4().hex,
        queue=_queue(queue) if queue else keys.lane_queue(spec, lane),  # type: ignore[arg-type]  # Celery takes a Queue too
    )


# What a message names as its sender and its reply queue (Celery sets both, and uses neither for a
# task whose result is ignored).
_ORIGIN, _REPLY_TO = anon_nodename(), str(uuid.uuid3(uuid.NAMESPACE_OID, "chronos-queue.api"))
# Task protocol 2's "embed" element, and its header defaults, as `send_task` writes them.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_message(job_ids: list[str], queue: str) -> bytes:
    """The message `send_jobs` sends, as the bytes kombu's Redis transport pushes onto the list named
    after the queue (priority 0), for a sender on asyncio (api/sender.py): one LPUSH on the event
    loop, where Celery can only publish blocking, from a thread, at ~270 µs of CPU a message.
    tests/test_celery_message.py compares it with `send_task`'s own, so a Celery that changes its
    message format fails the suite, not the workers."""
    single = len(job_ids) == 1
    task_id = job_ids[0] if single else uuid.uuid4().hex
    args = [job_ids[0] if single else list(job_ids)]
    body = base64.b64encode(json.dumps([args, {}, _EMBED]).encode()).decode()
    headers: dict[str, object] = {
        "lang": "py", "task": keys.FORECAST_TASK, "id": task_id, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
        "parent_id": None, "argsrepr": repr(args), "kwargsrepr": "{}", "origin": _ORIGIN, "ignore_result": None,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }  # fmt: skip
    properties = {
        "correlation_id": task_id, "reply_to": _REPLY_TO, "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0, "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }  # fmt: skip
    message = {"body": body, "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
               "properties": properties}  # fmt: skip
    return json.dumps(message).encode()


def job_ids(message: dict) -> list[str]:
    """The job ids a Celery message (as kombu's Redis transport stores it) carries."""
    (jobs,), _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return [jobs] if isinstance(jobs, str) else list(jobs)
