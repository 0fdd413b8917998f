"""Sync-path overhead: `/v1/predict` end to end vs a direct `predict_quantiles` call, in one run.

    .venv/bin/python bench/predict_latency.py [--model amazon/chronos-bolt-tiny] [--n 300]

Starts its own redis-server (free loopback port), one worker (`python -m workers`, synthetic
weights of the full architecture) and the API under uvicorn, then times N sequential
requests of one 512-point series, horizon 20, against N direct calls on the same
checkpoint in this process. Prints p50/p99 of both and the overhead. Everything it starts
is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import catalog, keys  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(stack: ExitStack, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    stack.callback(stop)
    return proc


def wait_until(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.1)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="amazon/chronos-bolt-tiny")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--horizon", type=int, default=20)
    args = parser.parse_args()
    spec = catalog.get(args.model)
    series = [float(10 + (i % 24) + 0.1 * i) for i in range(args.length)]
    body = {"model": spec.id, "inputs": [{"target": series}], "parameters": {"prediction_length": args.horizon}}

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmp = Path(tmp)
        redis_port, api_port = free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        spawn(stack, ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no", "--dir", str(tmp)], {}, tmp / "redis.log")  # fmt: skip
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        wait_until(lambda: _pings(client), "redis")
        env = {"REDIS_URL": redis_url, "WEIGHTS": "synthetic", "SYNTHETIC_DIR": str(ROOT / ".cache" / "synthetic"),
               "HEARTBEAT_S": "1", "CHRONOS_MODEL": spec.id, "AUTH_DISABLED": "true"}  # fmt: skip
        spawn(stack, [sys.executable, "-m", "workers"], env, tmp / "worker.log")
        api_cmd = ["uvicorn", "--factory", "api.main:create_app", "--port", str(api_port), "--log-level", "warning"]
        spawn(stack, [sys.executable, "-m", *api_cmd], env, tmp / "api.log")
        wait_until(lambda: client.hlen(keys.workers(spec)) > 0, "the worker")
        base = f"http://127.0.0.1:{api_port}"
        wait_until(lambda: _ok(f"{base}/readyz"), "the API")

        direct = _time_direct(spec, ROOT / ".cache" / "synthetic" / spec.slug, series, args)
        with httpx.Client(base_url=base, timeout=30) as http:
            for _ in range(20):  # warm-up: connections, code paths
                http.post("/v1/predict", json=body).raise_for_status()
            served, legs = [], []
            for _ in range(args.n):
                sent, started = time.time(), time.perf_counter()
                response = http.post("/v1/predict", json=body)
                served.append(time.perf_counter() - started)
                received = time.time()
                assert response.status_code == 200, response.text
                job = response.json()
                legs.append(
                    {
                        "HTTP in -> accepted": job["created_at"] - sent,
                        "queued": job["started_at"] - job["created_at"],
                        "in worker": job["finished_at"] - job["started_at"],
                        "  of which model": job["timings"]["inference_s"],
                        "stored -> client": received - job["finished_at"],
                    }
                )
        direct_again = _time_direct(spec, ROOT / ".cache" / "synthetic" / spec.slug, series, args)

    direct_all = direct + direct_again
    print(f"model {spec.id} (synthetic weights, full architecture), 1 series x {args.length} points, "
          f"horizon {args.horizon}, n={args.n}, torch threads={_threads()}")  # fmt: skip
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, samples in (("direct predict_quantiles", direct_all), ("POST /v1/predict", served)):
        print(f"{name:28}{1e3 * percentile(samples, 0.5):10.2f}{1e3 * percentile(samples, 0.99):10.2f}"
              f"{1e3 * statistics.fmean(samples):10.2f}")  # fmt: skip
    print("where a served request's time goes (median ms):")
    for leg in legs[0]:
        print(f"  {leg:24}{1e3 * statistics.median(entry[leg] for entry in legs):8.2f}")
    overhead = percentile(served, 0.5) - percentile(direct_all, 0.5)
    print(f"p50 overhead: {1e3 * overhead:.2f} ms  (target <= 5 ms)  "
          f"ratio served/direct p50: {percentile(served, 0.5) / percentile(direct_all, 0.5):.2f}")  # fmt: skip


def _time_direct(spec, path: Path, series: list[float], args) -> list[float]:
    import torch
    from chronos import BaseChronosPipeline

    pipeline = BaseChronosPipeline.from_pretrained(str(path), dtype=torch.float32)
    target = [torch.tensor(series[-spec.context_length :], dtype=torch.float32)]
    samples = []
    for i in range(args.n // 2 + 10):
        started = time.perf_counter()
        with torch.inference_mode():
            pipeline.predict_quantiles(target, prediction_length=args.horizon, quantile_levels=[0.1, 0.5, 0.9])
        if i >= 10:
            samples.append(time.perf_counter() - started)
    return samples


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
