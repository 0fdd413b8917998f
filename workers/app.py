"""The Celery worker: pinned to one model by CHRONOS_MODEL, consuming only that model's queues
(a training worker, `--train`: only its fine-tuning queue, workers/training.py).

`python -m workers` builds a `Worker` and starts Celery's threads pool with `slots()` jobs at
once. Built, the worker resolves its weights (building a synthetic checkpoint when told to,
failing fast when there are none); when Celery initialises the process, it loads the model once,
warms it up, starts the batcher's model threads, and announces itself in Redis so `/v1/models`
can count it. Each task thread then claims a job and feeds its series to the batcher
(workers/batcher.py).
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import threading
import time
from typing import NamedTuple

import redis
from celery import Celery, signals
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.catalog import ModelSpec
from shared.celery_app import make_celery
from shared.settings import Settings
from shared.store import JobStore, keys

from workers import metrics, reaper
from workers.batcher import Batcher
from workers.executor import RedisPassIO, execute
from workers.training import Trainer
from workers.weights import resolve

log = logging.getLogger("workers")

# How long a job's Redis writes keep retrying while Redis is away (a restart takes seconds).
REDIS_PATIENCE_S = 300.0


class Loaded(NamedTuple):
    """What a worker holds once it has loaded its model."""

    batcher: Batcher | None  # an inference worker's
    trainer: Trainer | None  # a training worker's
    store: JobStore
    name: str  # as listed under its model: <Celery hostname>/<pid>


class Worker:
    """One worker process: its Celery app, its model (inside the batcher, or the trainer), its job
    store, its name."""

    def __init__(self, settings: Settings, spec: ModelSpec, train: bool = False):
        self.settings, self.spec, self.train = settings, spec, train
        # Resolved before Celery starts: a serving worker also consumes the queue of jobs pinned to its revision.
        self.weights = resolve(spec, settings)
        revision = None if train else self.weights.revision
        self.app: Celery = make_celery(settings, serve=spec, revision=revision, train=train)
        # typing=False: Celery would check calls against the bound method's signature, `self` included.
        self.app.task(name=keys.FORECAST_TASK, typing=False)(self.forecast)
        self._loaded: Loaded | None = None
        self.stop = threading.Event()
        signals.worker_init.connect(self.load, weak=False)

    def slots(self) -> int:
        """Jobs held at once: enough to fill the next batch while one runs."""
        from workers.runtime import pick_device

        if self.train:  # one fine-tuning run at a time: it takes the whole device
            return 1
        if self.settings.worker_slots:
            return self.settings.worker_slots
        limit = self.settings.max_batch or self.spec.max_batch(pick_device(self.settings.device))
        return min(max(2 * limit, 8), 1024)

    def load(self, sender=None, **_) -> None:
        """Celery's worker_init: load the model, or end the process. Celery logs a handler's exception
        and carries on, and the worker would then take jobs it cannot run while never coming online."""
        try:
            self._load(sender)
        except Exception:
            log.critical("%s: the worker could not start", self.spec.id, exc_info=True)
            raise SystemExit(1) from None

    def _load(self, sender) -> None:
        settings, spec, weights = self.settings, self.spec, self.weights
        # First: a port already taken ends the start in milliseconds, not after the model's load.
        metrics.serve(settings.metrics_port)
        log.info("%s: %s weights from %s", spec.id, weights.kind, weights.source)
        if weights.kind == "synthetic":
            log.warning("*** %s serves SYNTHETIC weights: its forecasts are meaningless ***", spec.id)
        client = redis.Redis.from_url(
            settings.redis_url,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        store = JobStore(client, settings, patience_s=REDIS_PATIENCE_S)
        name = f"{sender.hostname}/{os.getpid()}"
        if self.train:
            trainer = Trainer(spec, weights, settings)
            metrics.LOAD.labels(spec.id).set(trainer.load_s)
            self._loaded = Loaded(None, trainer, store, name)
        else:
            from workers.runtime import ModelRuntime

            runtime = ModelRuntime(spec, weights, settings)
            metrics.LOAD.labels(spec.id).set(runtime.load_s)
            guard_s = settings.sync_guard_s
            if guard_s is None:  # measured on a CPU only: there the guard cost the flood and gained nothing
                guard_s = 0.0 if runtime.device == "cpu" else 10.0
            batcher = Batcher(
                runtime, RedisPassIO(store), settings.batch_wait_ms / 1000, guard_s, settings.sync_guard_batch,
                settings.async_threads,
            )  # fmt: skip
            batcher.start()
            metrics.watch_cpu(spec.id, batcher.threads)
            self._loaded = Loaded(batcher, None, store, name)
        # The model, torch and transformers leave some 400 000 long-lived objects that each full
        # collection would walk again: about 200 ms of CPU with the GIL held, the model threads and
        # every job stalled. Out of the collector's sight, a collection walks only what jobs allocate.
        gc.collect()
        gc.freeze()
        # Celery's two lines a message (received; succeeded with its statuses) say less than the
        # executor's line a wave (ids and statuses), and cost the consumer thread as much again
        # at thousands of jobs a second. Task failures still log, at ERROR.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        atexit.register(self._sign_off)

    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            raise RuntimeError("the worker has not loaded its model yet (Celery's worker_init)")
        return self._loaded

    def forecast(self, jobs: str | list[str]) -> list[str]:
        """The task: the job ids of one message (one id, or a list of the small jobs the API sent
        together); returns their statuses afterwards."""
        loaded = self.loaded
        job_ids = [jobs] if isinstance(jobs, str) else jobs
        if loaded.trainer is not None:
            from workers import training

            return training.execute(job_ids, loaded.trainer, loaded.store, loaded.name)
        assert loaded.batcher is not None
        metrics.MESSAGES.labels(self.spec.id).inc()
        return execute(job_ids, loaded.batcher, loaded.store, self.settings, loaded.name)

    def _sign_off(self) -> None:
        """At process exit (after a warm shutdown has finished the jobs in hand): leave the worker list.

        Not at Celery's shutdown signal: while jobs still run, the heartbeat must go on, or other
        workers would take this one for dead and run its jobs again.
        """
        self.stop.set()
        try:
            self.loaded.store.sign_off(self.spec, self.loaded.name, self.train)
        except redis.RedisError:
            pass

    def _heartbeat(self) -> None:
        """Keep this worker listed under its model while it lives (entries age out when it dies), and
        give the jobs of workers that died back to the queue (workers/reaper.py)."""
        loaded = self.loaded
        runtime = loaded.batcher.runtime if loaded.batcher else None
        held = runtime or loaded.trainer
        assert held is not None
        info = {
            "name": loaded.name,
            "weights": held.weights.kind,
            "revision": held.weights.revision,
            "device": held.device,
            "dtype": str(runtime.dtype).removeprefix("torch.") if runtime else "float32",  # a trainer trains in float32
            "started_at": time.time(),
            "load_s": round(held.load_s, 3),
            "max_batch": runtime.max_batch if runtime else 0,
            "slots": self.slots(),
            "role": "serve" if runtime else "train",
        }
        name = loaded.name
        beat = JobStore(self.loaded.store.client, self.settings)  # no patience: a missed beat is retried next beat
        busy_s, at = 0.0, time.monotonic()
        steady = reaper.Steady()
        while not self.stop.is_set():
            if loaded.batcher:  # the share of the time since the last beat the model spent in passes
                now, busy_s, was = time.monotonic(), loaded.batcher.busy.seconds(), busy_s
                info["busy"], at = round(min(1.0, (busy_s - was) / max(now - at, 1e-3)), 3), now
            ok = True
            try:
                beat.heartbeat(self.spec, name, info, self.train)
            except redis.RedisError as exc:
                ok = False
                log.warning("heartbeat failed: %s", exc)
            if steady.beat(ok):  # not right after an outage, when every worker's last beat is old
                try:
                    reaper.restore(self.app, beat, self.spec)
                    reaper.resend_lost(self.app, beat, self.spec, self.settings.lost_message_grace_s)
                except Exception as exc:  # the heartbeat must outlive any trouble here
                    log.warning("looking for a dead worker's jobs failed: %s", exc)
            self.stop.wait(self.settings.heartbeat_s)
