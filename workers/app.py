"""The Celery worker: pinned to one model by CHRONOS_MODEL, consuming only that model's queues.

Start it with `python -m workers` (or `celery -A workers.app worker`). The main process
resolves the weights (building a synthetic checkpoint when told to) and fails fast if
there are none; each pool process then loads the model once, warms it up, and
announces itself in Redis so `/v1/models` can count it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import redis
from celery import signals

from shared import catalog, keys
from shared.celery_app import make_celery
from shared.settings import get_settings
from workers import metrics
from workers.executor import execute
from workers.weights import Weights, resolve

log = logging.getLogger("workers")

settings = get_settings()
spec = catalog.get(settings.chronos_model) if settings.chronos_model else None

app = make_celery(settings, serve=spec)


class _Process:
    """What one pool process holds: its model, its Redis client, its name."""

    weights: Weights | None = None
    node: str = ""
    runtime = None
    client: redis.Redis | None = None
    name: str = ""
    stop = threading.Event()


@signals.worker_init.connect
def _resolve_weights(sender=None, **_):
    if spec is None:
        raise SystemExit("CHRONOS_MODEL is not set: a worker serves exactly one catalog model")
    if not spec.served:
        raise SystemExit(f"{spec.id} cannot be served by this worker yet")
    _Process.node = sender.hostname
    _Process.weights = resolve(spec, settings)
    metrics.serve(settings.metrics_port)
    log.info("%s: %s weights from %s", spec.id, _Process.weights.kind, _Process.weights.source)
    if _Process.weights.kind == "synthetic":
        log.warning("*** %s serves SYNTHETIC weights: its forecasts are meaningless ***", spec.id)


@signals.worker_process_init.connect
def _load_model(**_):
    from workers.runtime import ModelRuntime

    assert spec is not None and _Process.weights is not None
    _Process.runtime = ModelRuntime(spec, _Process.weights, settings)
    metrics.LOAD.labels(spec.id).set(_Process.runtime.load_s)
    _Process.client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    _Process.name = f"{_Process.node}/{os.getpid()}"
    threading.Thread(target=_heartbeat, name="heartbeat", daemon=True).start()


@signals.worker_process_shutdown.connect
def _sign_off(**_):
    _Process.stop.set()
    if _Process.client is not None and spec is not None:
        try:
            _Process.client.hdel(keys.workers(spec), _Process.name)
        except redis.RedisError:
            pass


def _heartbeat() -> None:
    """Keep this process listed under its model while it lives (entries age out when it dies)."""
    runtime = _Process.runtime
    info = {
        "name": _Process.name,
        "weights": runtime.weights.kind,
        "device": runtime.device,
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "started_at": time.time(),
        "load_s": round(runtime.load_s, 3),
    }
    key = keys.workers(spec)
    while not _Process.stop.is_set():
        try:
            with _Process.client.pipeline() as pipe:
                pipe.hset(key, _Process.name, json.dumps({**info, "last_seen": time.time()}))
                pipe.expire(key, int(settings.heartbeat_s * 6) + 1)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("heartbeat failed: %s", exc)
        _Process.stop.wait(settings.heartbeat_s)


@app.task(name=keys.FORECAST_TASK)
def forecast(job_id: str, payload: dict) -> str:
    return execute(job_id, payload, _Process.runtime, _Process.client, settings, _Process.name)
