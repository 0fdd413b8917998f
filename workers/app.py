"""The Celery worker: pinned to one model by CHRONOS_MODEL, consuming only that model's queues.

Start it with `python -m workers` (threads pool, `slots()` jobs at once). At start the worker
resolves its weights (building a synthetic checkpoint when told to, failing fast when there
are none), loads the model once, warms it up, starts the batcher's model thread, and announces
itself in Redis so `/v1/models` can count it. Each task thread then claims a job and feeds
its series to the batcher (workers/batcher.py).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time

import redis
from celery import signals
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared import catalog, keys
from shared.celery_app import make_celery
from shared.settings import get_settings
from workers import metrics, reaper
from workers.batcher import Batcher
from workers.executor import RedisPassIO, execute
from workers.weights import resolve

log = logging.getLogger("workers")

settings = get_settings()
spec = catalog.get(settings.chronos_model) if settings.chronos_model else None

app = make_celery(settings, serve=spec)


def slots() -> int:
    """Jobs held at once: enough to fill the next batch while one runs."""
    from workers.runtime import pick_device

    if settings.worker_slots:
        return settings.worker_slots
    limit = settings.max_batch or (spec.max_batch(pick_device(settings.device)) if spec else 1)
    return min(max(2 * limit, 8), 1024)


class _Worker:
    """What this worker process holds: its batcher (and model), its Redis client, its name."""

    batcher: Batcher | None = None
    client: redis.Redis | None = None
    raw: redis.Redis | None = None  # binary replies: series and results
    name: str = ""
    stop = threading.Event()


@signals.worker_init.connect
def _load(sender=None, **_):
    from workers.runtime import ModelRuntime

    if spec is None:
        raise SystemExit("CHRONOS_MODEL is not set: a worker serves exactly one catalog model")
    weights = resolve(spec, settings)
    log.info("%s: %s weights from %s", spec.id, weights.kind, weights.source)
    if weights.kind == "synthetic":
        log.warning("*** %s serves SYNTHETIC weights: its forecasts are meaningless ***", spec.id)
    runtime = ModelRuntime(spec, weights, settings)
    metrics.LOAD.labels(spec.id).set(runtime.load_s)
    metrics.serve(settings.metrics_port)
    _Worker.client, _Worker.raw = (
        redis.Redis.from_url(
            settings.redis_url, decode_responses=text,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3), retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        for text in (True, False)
    )  # fmt: skip
    _Worker.batcher = Batcher(runtime, RedisPassIO(_Worker.raw, settings.result_ttl_s), wait_s=settings.batch_wait_ms / 1000)
    _Worker.batcher.start()
    metrics.watch_cpu(spec.id, _Worker.batcher.thread)
    _Worker.name = f"{sender.hostname}/{os.getpid()}"
    threading.Thread(target=_heartbeat, name="heartbeat", daemon=True).start()
    atexit.register(_sign_off)


def _sign_off() -> None:
    """At process exit (after a warm shutdown has finished the jobs in hand): leave the worker list.

    Not at Celery's shutdown signal: while jobs still run, the heartbeat must go on, or other
    workers would take this one for dead and run its jobs again.
    """
    _Worker.stop.set()
    try:
        _Worker.client.hdel(keys.workers(spec), _Worker.name)
    except redis.RedisError:
        pass


def _heartbeat() -> None:
    """Keep this worker listed under its model while it lives (entries age out when it dies), and
    give the jobs of workers that died back to the queue (workers/reaper.py)."""
    runtime = _Worker.batcher.runtime
    info = {
        "name": _Worker.name,
        "weights": runtime.weights.kind,
        "revision": runtime.weights.revision,
        "device": runtime.device,
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "started_at": time.time(),
        "load_s": round(runtime.load_s, 3),
        "max_batch": runtime.max_batch,
        "slots": slots(),
    }
    key = keys.workers(spec)
    while not _Worker.stop.is_set():
        try:
            with _Worker.client.pipeline() as pipe:
                pipe.hset(key, _Worker.name, json.dumps({**info, "last_seen": time.time()}))
                pipe.expire(key, int(settings.heartbeat_s * 6) + 1)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("heartbeat failed: %s", exc)
        try:
            reaper.restore(app, _Worker.client, spec, settings.heartbeat_s)
            reaper.resend_lost(app, _Worker.client, spec, settings.lost_message_grace_s)
        except Exception as exc:  # the heartbeat must outlive any trouble here
            log.warning("looking for a dead worker's jobs failed: %s", exc)
        _Worker.stop.wait(settings.heartbeat_s)


@app.task(name=keys.FORECAST_TASK)
def forecast(job_id: str) -> str:
    return execute(job_id, _Worker.batcher, _Worker.client, _Worker.raw, settings, _Worker.name)
