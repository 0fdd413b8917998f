"""Real parts, really started: redis-server on a free loopback port, Celery workers as subprocesses
(`python -m workers`, the production entry point) serving seeded synthetic checkpoints."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from shared import catalog
from shared.store import keys
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BOLT = "amazon/chronos-bolt-tiny"
T5 = "amazon/chronos-t5-tiny"
API_KEY = "test-key"
OTHER_KEY = "other-key"


def process_table() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, session id), read from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[3]))
    return table


def _outside_ephemeral() -> range:
    """Ports below the kernel's ephemeral range, or above it where it starts too low to leave room."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    below, above = range(10_000, low - 8), range(high + 1, 65_528)
    return max(below, above, key=len) if max(len(below), len(above)) > 1000 else range(10_000, 65_528)


_PORTS = random.SystemRandom()
_OUTSIDE_EPHEMERAL = _outside_ephemeral()
_handed_out: set[int] = set()


def free_port(span: int = 1) -> int:
    """A port (the first of `span` in a row, at most 8) nothing listens on, outside the kernel's
    ephemeral range.

    Not bind(0)'s: that port lies inside the range, where any connection made before the server
    binds it (a Redis client's, say) can take it; a worker then failed to serve its metrics port.
    """
    while True:
        first = _PORTS.choice(_OUTSIDE_EPHEMERAL)
        ports = range(first, first + span)
        if _handed_out.isdisjoint(ports) and all(_bindable(port) for port in ports):
            _handed_out.update(ports)
            return first


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    url: str = field(init=False)

    def __post_init__(self):
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


def start_redis(workdir: Path, *extra: str, port: int | None = None) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (`.ci/run` installs it; locally: apt-get install redis-server)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir), *extra],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    server = RedisServer(port, proc)
    deadline = time.monotonic() + 10
    while True:
        try:
            server.client().ping()
            return server
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Seeded synthetic checkpoints of the full tiny architectures, built once per session."""
    from workers import synthetic

    out = tmp_path_factory.mktemp("synthetic")
    for model in (BOLT, T5):
        spec = catalog.get(model)
        synthetic.build(spec, out / spec.slug, seed=0)
    return out


# Tests that fail jobs on purpose must not open a model's circuit for the others (tests/test_breaker.py
# sets its own thresholds).
NO_BREAKER = 1_000_000


def settings_for(redis_server: RedisServer, **overrides) -> Settings:
    return Settings(
        _env_file=None, redis_url=redis_server.url,
        **{"api_keys": f"{API_KEY},{OTHER_KEY}", "breaker_min_jobs": NO_BREAKER, **overrides},
    )  # fmt: skip


@dataclass
class Worker:
    model: str
    process: subprocess.Popen
    log: Path
    metrics_port: int = 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def start_worker(redis_server: RedisServer, synthetic_dir: Path, model: str, logdir: Path, **env) -> Worker:
    """A worker process of `model`, once it is listed online."""
    client = redis_server.client()
    registry = keys.workers(catalog.get(model), train=env.get("TRAIN") == "true")  # a training worker has its own list
    before = set(client.hkeys(registry))
    worker = spawn_worker(redis_server, synthetic_dir, model, logdir, **env)
    deadline = time.monotonic() + 120
    while not (set(client.hkeys(registry)) - before):
        if worker.process.poll() is not None or time.monotonic() > deadline:
            worker.stop()
            pytest.fail(f"worker for {model} did not come up:\n{worker.tail()}")
        time.sleep(0.2)
    return worker


def spawn_worker(redis_server: RedisServer, synthetic_dir: Path, model: str, logdir: Path, **env) -> Worker:
    """A worker process of `model`, just started."""
    spec = catalog.get(model)
    log = logdir / f"worker-{spec.slug}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers"],
        cwd=ROOT,
        env={
            **os.environ,
            "CHRONOS_MODEL": model,
            "REDIS_URL": redis_server.url,
            "WEIGHTS": "synthetic",
            "SYNTHETIC_DIR": str(synthetic_dir),
            "HEARTBEAT_S": "1",
            "PYTHONUNBUFFERED": "1",
            "BREAKER_MIN_JOBS": str(NO_BREAKER),
            **env,
        },
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Worker(model, proc, log, int(env.get("METRICS_PORT", 0)))


@pytest.fixture(scope="session")
def workers(redis_server, synthetic_dir, tmp_path_factory) -> Iterator[dict[str, Worker]]:
    """One worker per test model, shared by the whole session."""
    logdir = tmp_path_factory.mktemp("logs")
    # The Bolt worker batches across jobs (default slots); the T5 worker holds one job at a time, so
    # the tests of queue order (a backlog, a cancelled queued job) have a queue to look at.
    slots = {BOLT: "0", T5: "1"}
    started = {
        model: start_worker(redis_server, synthetic_dir, model, logdir, METRICS_PORT=str(free_port()),
                            WORKER_SLOTS=slots[model])
        for model in (BOLT, T5)
    }  # fmt: skip
    yield started
    for worker in started.values():
        worker.stop()


@pytest.fixture()
def api(redis_server) -> Iterator[TestClient]:
    """The FastAPI app (lifespan and all) against the test Redis, with heartbeats read at test pace."""
    from api.main import create_app

    with TestClient(create_app(settings_for(redis_server, heartbeat_s=1)), headers={"X-API-Key": API_KEY}) as client:
        yield client


@pytest.fixture()
def small_limits_api(redis_server) -> Iterator[TestClient]:
    from api.main import create_app

    settings = settings_for(
        redis_server, max_series=3, max_points=50, max_prediction_length=30, max_num_samples=10, max_body_bytes=4096
    )
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def forecast_body(model: str = BOLT, n_series: int = 1, length: int = 64, horizon: int = 8, **params) -> dict:
    inputs = [
        {"item_id": f"s{i}", "target": [float((t * (i + 1)) % 13) for t in range(length + i)]} for i in range(n_series)
    ]
    return {"model": model, "inputs": inputs, "parameters": {"prediction_length": horizon, **params}}


def wait_for(api: TestClient, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = api.get(f"/v1/forecasts/{job_id}", params={"wait": 10}).json()
        if body["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return body


def job_keys(client: redis.Redis) -> set[str]:
    """The job records in Redis (not their series, results and items, which share the prefix)."""
    return {key for key in client.scan_iter(keys.job("*")) if key.count(":") == keys.job("x").count(":")}


def start_api(redis_server: RedisServer, logdir: Path, **env: str) -> tuple[str, subprocess.Popen]:
    """The API as deployed (`python -m api`), two processes, on a free port: its base URL and process."""
    port = free_port()
    log = logdir / f"api-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_server.url, "API_KEYS": f"{API_KEY},{OTHER_KEY}", "HEARTBEAT_S": "1",
             "WEB_CONCURRENCY": "2", "PROMETHEUS_MULTIPROC_DIR": "", **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return base, proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the API did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def live_api(redis_server, tmp_path_factory) -> Iterator[str]:
    """The API as deployed on a free port; yields its base URL."""
    base, proc = start_api(redis_server, tmp_path_factory.mktemp("api"))
    yield base
    proc.terminate()
    proc.wait(10)
