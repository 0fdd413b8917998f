"""Prometheus metrics of the API process, served at `/metrics` together with the queue state.

Request latency is labelled by route template (`/v1/forecasts/{job_id}`), never by raw path, so
the series count stays bounded. Queue depths and workers online are read from Redis at scrape
time (one pipelined round trip), which is the gauge Flower does not have.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from shared.schemas import ModelView

from api.breaker import CIRCUIT_STATES

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ApiMetrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        # Several API processes (`python -m api`): each writes its samples to files under
        # PROMETHEUS_MULTIPROC_DIR, and the exported registry reads all of them.
        shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        own = CollectorRegistry() if shared else self.registry
        if shared:
            MultiProcessCollector(self.registry)
        self.requests = Histogram(
            "chronos_queue_http_request_duration_seconds", "HTTP request latency by route and status.",
            ["method", "route", "status"], buckets=_LATENCY_BUCKETS, registry=own,
        )  # fmt: skip
        self.accepted = Counter(
            "chronos_queue_jobs_accepted_total",
            "Jobs accepted, by model and lane ('cached': answered from the result cache).", ["model", "lane"],
            registry=own,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "chronos_queue_queue_depth", "Messages waiting in a model's queue.", ["model", "lane"],
            registry=own, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.ab_requests = Counter(
            "chronos_queue_ab_requests_total",
            "Requests for a model with an A/B split (AB_SPLITS), by model asked for and arm picked.",
            ["model", "arm"], registry=own,
        )  # fmt: skip
        self.circuit = Gauge(
            "chronos_queue_circuit_state", "A model's circuit breaker: 1 for the state it is in, else 0.",
            ["model", "state"], registry=own, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.workers_online = Gauge(
            "chronos_queue_workers_online", "Worker processes heard from recently, by model.", ["model"],
            registry=own, multiprocess_mode="mostrecent",
        )  # fmt: skip

    def render(self, views: list[ModelView]) -> tuple[bytes, str]:
        for view in views:
            self.queue_depth.labels(view.id, "async").set(view.queue_depth)
            self.queue_depth.labels(view.id, "sync").set(view.sync_queue_depth)
            self.workers_online.labels(view.id).set(view.workers_online)
            for state in CIRCUIT_STATES:
                self.circuit.labels(view.id, state).set(float(view.circuit == state))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """ASGI middleware: observe every HTTP request's latency under its route template."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics
        self._timers: dict[tuple[str, str, int], Histogram] = {}  # the histogram's child by method, route, status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            key = (scope["method"], getattr(route, "path", "unmatched"), status)
            timer = self._timers.get(key)
            if timer is None:  # `labels` checks and locks at each call (2.7 µs); the routes are few
                timer = self._timers[key] = self.metrics.requests.labels(key[0], key[1], str(status))
            timer.observe(time.perf_counter() - started)
