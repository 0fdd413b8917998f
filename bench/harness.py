"""What the benchmarks share: a stack of real processes on free loopback ports, and the raw pipeline.

`Stack` starts redis-server, one `python -m workers` per model (synthetic weights of the full
architecture, built once into .cache/synthetic) and the API under uvicorn, and stops them all
on exit. `Raw` loads the same checkpoint in the benchmark's own process for side-by-side figures.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import catalog  # noqa: E402
from shared.store import keys  # noqa: E402
from workers import spin_briefly  # noqa: E402

spin_briefly()  # the raw pipeline runs torch as a serving worker does: set before anything loads torch

SYNTHETIC = ROOT / ".cache" / "synthetic"


_given: set[int] = set()


def free_port() -> int:
    """A free port outside the kernel's ephemeral range (tests/conftest.py's `free_port` says why: a
    flood's connections would otherwise take a restarted worker's metrics port)."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    outside = max(range(10_000, low), range(high + 1, 65_536), key=len)  # a range starting low: above it
    for port in random.SystemRandom().sample(outside, 200):
        try:
            socket.create_server(("127.0.0.1", port)).close()
        except OSError:
            continue
        if port not in _given:
            _given.add(port)
            return port
    raise RuntimeError("no free port outside the ephemeral range")


def wait_until(check, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.1)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def series(n: int, k: int = 0) -> list[float]:
    """Series k: a daily-like cycle on a trend. numpy, not a list comprehension: the flood's load
    generator makes one per job, and the comprehension cost 46 µs of its CPU (the values are the same)."""
    i = np.arange(n)
    return ((10 + (i + 3 * k) % 24) + 0.1 * i + 0.01 * k).tolist()


class Stack:
    """redis-server, the API and one worker per model, as separate processes; a context manager."""

    def __init__(
        self, models: list[str], worker_env: dict[str, str] | None = None, workers_per_model: int = 1, aof: bool = False,
        api_env: dict[str, str] | None = None, trainers: list[str] = (),  # type: ignore[assignment]
    ):  # fmt: skip
        self.specs = [catalog.get(m) for m in models]
        self.trained = [catalog.get(m) for m in trainers]
        self.worker_env, self.api_env = worker_env or {}, api_env or {}
        self.workers_per_model, self.aof = workers_per_model, aof
        self.procs: dict[str, subprocess.Popen] = {}
        self._exit = ExitStack()

    def __enter__(self) -> Stack:
        tmp = Path(self._exit.enter_context(tempfile.TemporaryDirectory()))
        self.logs = tmp
        redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self._redis_args = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec",
                            "--dir", str(tmp)]  # fmt: skip
        self._spawn(self._redis_args, {}, "redis")
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        wait_until(self._pings, "redis")
        self.env = {"REDIS_URL": self.redis_url, "WEIGHTS": "synthetic", "SYNTHETIC_DIR": str(SYNTHETIC),
                    "HEARTBEAT_S": "1", "AUTH_DISABLED": "true", "RATE_LIMIT_PER_S": "0",
                    # Benchmarks measure the model path: repeated bodies must not be answered from the cache.
                    "CACHE_TTL_S": "0", "MODEL_STORE": str(tmp / "models")}  # fmt: skip
        self.metrics_ports: dict[str, tuple[str, int]] = {}  # worker name -> (model, metrics port)
        for spec in self.specs:
            for i in range(self.workers_per_model):
                self.start_worker(spec.id, f"worker-{spec.slug}" + (f"-{i}" if i else ""))
        for spec in self.trained:
            env = {**self.env, "CHRONOS_MODEL": spec.id, **self.worker_env}
            self._spawn([sys.executable, "-m", "workers", "--train"], env, f"trainer-{spec.slug}")
        self.base = self.start_api(self.api_env)  # starting while the workers load
        for spec in self.specs:
            wait_until(lambda spec=spec: self.redis.hlen(keys.workers(spec)) > 0, f"the {spec.slug} worker")
        for spec in self.trained:
            wait_until(lambda spec=spec: self.redis.hlen(keys.workers(spec, train=True)) > 0, f"the {spec.slug} trainer")
        wait_until(lambda: _ok(f"{self.base}/readyz"), "the API")
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:  # say why, before the logs go with the temporary directory
            for log in sorted(self.logs.glob("*.log")):
                print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        self._exit.close()

    def start_api(self, env: dict[str, str], name: str = "api", root: Path = ROOT) -> str:
        """`python -m api` of the checkout at `root` on this stack's Redis, on a free port, as
        process `name` (stopped with the stack); its base URL, ready or not yet."""
        port = free_port()
        args = [sys.executable, "-m", "api", "--port", str(port), "--log-level", "warning"]
        self._spawn(args, {**self.env, **env}, name, cwd=root)
        return f"http://127.0.0.1:{port}"

    def start_worker(self, model: str, name: str) -> None:
        port = free_port()
        self.metrics_ports[name] = (model, port)  # a restarted worker replaces its predecessor
        env = {**self.env, "CHRONOS_MODEL": model, "METRICS_PORT": str(port), **self.worker_env}
        self._spawn([sys.executable, "-m", "workers"], env, name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process (and everything it started) and wait for it to go."""
        proc = self.procs[name]
        os.killpg(proc.pid, sig)
        proc.wait(60)

    def restart_redis(self, down_s: float = 2.0) -> None:
        """Stop Redis as an operator would (SIGTERM: it writes its append-only file), then start it again."""
        self.kill("redis", signal.SIGTERM)
        time.sleep(down_s)
        self._spawn(self._redis_args, {}, "redis")
        wait_until(self._pings, "redis")

    def worker_metric(self, model: str, name: str, **labels: str) -> float:
        """A metric of the model's workers (e.g. chronos_queue_worker_batch_size_sum), summed over its
        samples with these labels and over every worker of the model."""
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        total = 0.0
        for of, port in self.metrics_ports.values():
            if of == model:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                             if line.startswith(name + "{") and all(w in line for w in wanted))  # fmt: skip
        return total

    def _spawn(self, args: list[str], env: dict, name: str, cwd: Path = ROOT) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **env}, stdout=log.open("a"),
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

        def stop():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

        self._exit.callback(stop)
        self.procs[name] = proc
        return proc

    def _pings(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.ConnectionError:
            return False


class Raw:
    """The same synthetic checkpoint, loaded in this process: the baseline the service is measured against."""

    def __init__(self, model: str, dtype: str = "auto"):
        import torch
        from chronos import BaseChronosPipeline

        from workers.runtime import keep_freed_memory, pick_dtype

        keep_freed_memory()  # the allocator a worker runs with: the raw pipeline's best case too
        self.spec = catalog.get(model)
        self.torch = torch
        # The device and dtype a worker would pick (workers/runtime.py): CUDA in bfloat16 when present,
        # `dtype` as a worker's DTYPE.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        path = str(SYNTHETIC / self.spec.slug)
        self.pipeline = BaseChronosPipeline.from_pretrained(path, device_map=device, dtype=pick_dtype(dtype, device))

    def call(self, batch, horizon: int) -> None:
        """One forward pass over a prebuilt 2-D tensor [series, time]: the hardware's best case."""
        with self.torch.inference_mode():
            self.pipeline.predict_quantiles(batch, prediction_length=horizon, quantile_levels=[0.1, 0.5, 0.9])

    def throughput(self, batch: int, length: int, horizon: int, seconds: float = 4.0) -> float:
        """Series per second at this batch size, over about `seconds` after one warm-up call."""
        tensor = self.torch.tensor([series(length, k) for k in range(batch)], dtype=self.torch.float32)
        self.call(tensor, horizon)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.call(tensor, horizon)
            done += batch
        return done / (time.perf_counter() - started)

    def batches(self) -> list[int]:
        """Batch sizes worth trying on this device: up to 256 on a CPU, up to 2048 on a GPU."""
        cuda = self.torch.cuda.is_available()
        return [32, 64, 128, 256, *([512, 1024, 2048] if cuda else [])]

    def best(self, batches: list[int] | None, length: int, horizon: int) -> tuple[int, float]:
        """The batch size with the best throughput (of `batches`, else the device's), and that throughput."""
        rates = {b: self.throughput(b, length, horizon) for b in batches or self.batches()}
        for b, rate in rates.items():
            print(f"  raw batch {b:5d}: {rate:8.1f} series/s")
        best = max(rates, key=rates.get)
        return best, rates[best]


# Calls a client makes in a row before the next client's turn (`timed_predicts`).
BLOCK = 50


def timed_predicts(
    base: str, model: str, n: int, length: int, horizon: int, clients: tuple[str, ...] = ("httpx",)
) -> dict[str, tuple[list[float], dict[str, float]]]:
    """For each of `clients`: the latencies of n sequential /v1/predict calls (after 10 warm-up
    calls), and the median time of each leg of a call (timestamps from the job record and the
    client, one clock). Several clients take turns every `BLOCK` calls, so a slower spell of the
    machine falls on them alike (call by call, the API processes would each see every other call
    and run colder than under one client).

    A call's body is built and JSON-encoded before its clock starts, as the direct call's tensor is
    built before its own: what is timed is the service. The encoding is reported apart. A client is
    httpx (what the project's client, client/api.py, sends with) or the standard library's
    http.client (what `requests` sends with), on one kept-alive connection either way."""
    timed: dict[str, tuple[list[float], list[dict[str, float]]]] = {client: ([], []) for client in clients}
    with ExitStack() as stack:
        posts = {client: stack.enter_context(_poster(base, client)) for client in clients}
        turns = [(client, i) for start in range(0, n + 10, BLOCK) for client in clients
                 for i in range(start, min(start + BLOCK, n + 10))]  # fmt: skip
        for k, (client, i) in enumerate(turns):
            post = posts[client]
            payload = {"model": model, "inputs": [{"target": series(length, 7_000_000 + k)}],
                       "parameters": {"prediction_length": horizon}}  # fmt: skip
            encoding = time.perf_counter()
            body = json.dumps(payload).encode()
            encoded = time.perf_counter() - encoding
            sent, started = time.time(), time.perf_counter()
            status, answer = post(body)
            elapsed, received = time.perf_counter() - started, time.time()
            assert status == 200, answer
            job = json.loads(answer)
            if i >= 10:
                latencies, legs = timed[client]
                latencies.append(elapsed)
                legs.append({
                    "HTTP in -> accepted": job["created_at"] - sent,
                    "accepted -> claimed": job["started_at"] - job["created_at"],
                    "claimed -> stored": job["finished_at"] - job["started_at"],
                    "  of which model pass": job["timings"]["inference_s"],
                    "stored -> client": received - job["finished_at"],
                    "client encodes the body (untimed)": encoded,
                })  # fmt: skip
    return {
        client: (latencies, {leg: statistics.median(entry[leg] for entry in legs) for leg in legs[0]})
        for client, (latencies, legs) in timed.items()
    }


@contextmanager
def _poster(base: str, client: str) -> Iterator[Callable[[bytes], tuple[int, bytes]]]:
    """A function that POSTs a JSON body to /v1/predict and returns (status, body), with `client`."""
    headers = {"Content-Type": "application/json"}
    if client == "httpx":
        with httpx.Client(base_url=base, timeout=60) as session:

            def post_httpx(body: bytes) -> tuple[int, bytes]:
                response = session.post("/v1/predict", content=body, headers=headers)
                return response.status_code, response.content

            yield post_httpx
        return
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def post_stdlib(body: bytes) -> tuple[int, bytes]:
        connection.request("POST", "/v1/predict", body, headers)
        response = connection.getresponse()
        return response.status, response.read()

    try:
        yield post_stdlib
    finally:
        connection.close()


def cpu_seconds(pid: int, with_children: bool = True) -> float:
    """CPU time (user + system) of a process and, by default, of every process below it, from /proc."""
    pids, total = [pid], 0.0
    if with_children:
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
        frontier = [pid]
        while frontier:
            frontier = [child for child, parent in parents.items() if parent in frontier]
            pids += frontier
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class LeanHTTP(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the flood's load generator: requests go out as bytes
    written once, answers are parsed by httptools (uvicorn's parser, installed with it).

    Why not aiohttp: on two cores the load generator's CPU is taken from the model it measures.
    aiohttp cost ~500 µs a job (`Prefer: wait`, this CPU; its request and response objects,
    cookie jar, timers and stream readers); a fixed request written as bytes and parsed in C costs
    a fraction of that (bench/README.md, session 14). Only what the flood needs: no redirects, no
    chunked requests, one request at a time per connection. A connection the server closed (idle
    past uvicorn's keep-alive, or after a `Connection: close` answer) is `closed`: its callers open
    another instead of waiting on it forever.
    """

    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future | None = None
        self._body: list[bytes] = []
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> LeanHTTP:
        _, protocol = await asyncio.get_running_loop().create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport) -> None:
        self._transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body, self._body = b"".join(self._body), []
        if not self._parser.should_keep_alive():
            self.close()
        self._answer.set_result((self._parser.get_status_code(), body))

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request (`head`: request line and headers, without the blank line) and return
        the answer's status and body."""
        if self.closed or self._transport.is_closing():
            raise ConnectionError("the connection is closed")
        self._answer = asyncio.get_running_loop().create_future()
        self._transport.write(b"%s\r\nContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
        return await self._answer

    def close(self) -> None:
        self.closed = True
        self._transport.close()
