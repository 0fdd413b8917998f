"""Prometheus metrics of a worker: jobs by outcome, inference time, batch size, queue wait, load time.

Jobs run in Celery's pool processes while the HTTP endpoint (METRICS_PORT) lives in the main
process, so the metrics use prometheus_client's multiprocess mode: every process writes its
values under PROMETHEUS_MULTIPROC_DIR and the endpoint sums them. `python -m workers` gives
each worker a fresh directory before anything imports prometheus_client; without one (a job
run in-process, as some tests do) the metrics simply stay in that process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

log = logging.getLogger(__name__)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

JOBS = Counter("chronos_queue_worker_jobs_total", "Jobs handled, by outcome.", ["model", "outcome"])
SERIES = Counter("chronos_queue_worker_series_total", "Series forecast.", ["model"])
INFERENCE = Histogram(
    "chronos_queue_worker_inference_seconds", "Model time per job.", ["model"], buckets=_SECONDS
)  # fmt: skip
BATCH = Histogram(
    "chronos_queue_worker_batch_size", "Series per forward pass.", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)  # fmt: skip
QUEUE_WAIT = Histogram(
    "chronos_queue_worker_queue_wait_seconds", "From acceptance to a worker starting the job.", ["model", "lane"],
    buckets=_SECONDS,
)  # fmt: skip
LOAD = Gauge(
    "chronos_queue_worker_model_load_seconds", "Time to load the model.", ["model"], multiprocess_mode="max"
)  # fmt: skip


def serve(port: int) -> None:
    """In the worker's main process, before the pool starts: serve the pool's metrics on `port`."""
    if not port:
        return
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("METRICS_PORT is set but PROMETHEUS_MULTIPROC_DIR is not: start the worker with `python -m workers`")
        return
    for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        stale.unlink()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, registry=registry)
    log.info("metrics on :%d/metrics", port)
