"""Prometheus metrics of a worker: jobs by outcome, inference time, batch size, queue wait, load time.

A worker is one process (task threads plus the model thread), so the default registry holds
everything; `serve` exposes it on METRICS_PORT.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

log = logging.getLogger(__name__)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

JOBS = Counter("chronos_queue_worker_jobs_total", "Jobs handled, by outcome.", ["model", "outcome"])
SERIES = Counter("chronos_queue_worker_series_total", "Series forecast.", ["model"])
# Jobs per message is what the API's shared messages (api/sender.py) buy a worker under a flood.
MESSAGES = Counter(
    "chronos_queue_worker_messages_total", "Queue messages handled (one job, or several small ones).", ["model"]
)
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


class CpuSplit:
    """`chronos_queue_worker_cpu_seconds_total{part}`: this process's CPU time, split into `model`
    (the model threads, and the native threads torch runs its kernels on: every thread that is not a
    Python thread) and `bookkeeping` (the rest: Celery, claiming, reading, slicing, storing). Read
    from /proc at scrape time. What a flood costs per job outside the model is bookkeeping / jobs."""

    def __init__(self, model: str, model_threads: list[threading.Thread]):
        self.model, self.model_threads = model, model_threads

    def collect(self):
        ticks = os.sysconf("SC_CLK_TCK")
        python = {t.native_id for t in threading.enumerate()} - {t.native_id for t in self.model_threads}
        split = {"model": 0.0, "bookkeeping": 0.0}
        for task in Path("/proc/self/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended meanwhile
                continue
            part = "bookkeeping" if int(task.name) in python else "model"
            split[part] += (int(fields[11]) + int(fields[12])) / ticks
        family = CounterMetricFamily(
            "chronos_queue_worker_cpu_seconds", "CPU time of this worker process, in the model or around it.",
            labels=["model", "part"],
        )  # fmt: skip
        for part, seconds in split.items():
            family.add_metric([self.model, part], seconds)
        yield family


def watch_cpu(model: str, model_threads: list[threading.Thread]) -> None:
    """Export this process's CPU split (`CpuSplit`) from now on."""
    REGISTRY.register(CpuSplit(model, model_threads))


def serve(port: int) -> None:
    """Serve this worker's metrics on `port` (0: not at all)."""
    if port:
        try:
            start_http_server(port)
        except OSError as exc:
            raise OSError(exc.errno, f"the metrics port (METRICS_PORT) {port}: {exc.strerror}") from exc
        log.info("metrics on :%d/metrics", port)
