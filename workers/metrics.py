"""Prometheus metrics of a worker: jobs by outcome, inference time, batch size, queue wait, load time.

A worker is one process (task threads plus the model thread), so the default registry holds
everything; `serve` exposes it on METRICS_PORT.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
LOAD = Gauge("chronos_queue_worker_model_load_seconds", "Time to load the model.", ["model"])


def serve(port: int) -> None:
    """Serve this worker's metrics on `port` (0: not at all)."""
    if port:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)
