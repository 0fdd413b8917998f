"""Throughput of the whole path against the raw pipeline, side by side in one run.

    .venv/bin/python bench/throughput.py flood [--model amazon/chronos-bolt-tiny] [--clients 128] [--seconds 20] [--workers 1]
                                               [--prefer-wait] [--rate JOBS_PER_S]
    .venv/bin/python bench/throughput.py sync  [--model amazon/chronos-bolt-tiny] [--n 100] [--clients 64]
    .venv/bin/python bench/throughput.py bulk  [--model amazon/chronos-bolt-small] [--series 10000]

flood: many concurrent clients, each submitting one-series async jobs (POST /v1/forecasts, then
       long-wait GET) in a loop, HTTP → queue → worker → result; series/s completed in the
       measuring window vs the raw pipeline's best batched throughput on the same checkpoint
       (measured before the flood and again after it, at the best batch: the ratio is against
       the mean of the two).
       With --rate, jobs arrive at a fixed rate instead (open loop): steadier per-job costs, for
       comparing two versions of the code.
sync:  p50/p99 of sequential POST /v1/predict with no load, then with a flood of async jobs for
       the same model running in another process.
bulk:  one job of many series (default 10,000) from POST to the last result, vs raw batched.

Each run starts its own redis-server, worker and API (bench/harness.py) and stops them after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx

from harness import ROOT, LeanHTTP, Raw, Stack, cpu_seconds, percentile, series, timed_predicts, torch_threads

LENGTH, HORIZON = 512, 20


def body(model: str, targets: list[list[float]], horizon: int = HORIZON) -> dict:
    return {"model": model, "inputs": [{"target": t} for t in targets], "parameters": {"prediction_length": horizon}}


async def _flood(
    base: str,
    model: str,
    clients: int,
    warmup_s: float,
    seconds: float,
    length: int,
    prefer_wait: bool = False,
    rate: float | None = None,
) -> tuple[list[float], list[float], int]:
    """Completion times (monotonic) of one-series jobs, their latencies (POST to result, in the same
    order), and how many arrivals found every client busy.

    Closed loop (no `rate`): `clients` clients each loop, one job at a time, for warmup + seconds.
    Open loop (`rate` jobs/s): a job starts every 1/rate s whatever the service does, with at most
    `clients` in flight; an arrival that finds them all busy is skipped and counted (the rate is
    above what the service sustains). Fixed arrivals make runs comparable: a closed loop's clients
    move in bursts, and the per-job costs follow the bursts' message sizes.

    A job POSTs and long-waits with GET, or with `prefer_wait` sends `Prefer: wait` with the POST
    (one request per job) and GETs only if the job is not done by then.

    The requests go out on keep-alive connections of `harness.LeanHTTP`, one per client in flight,
    bodies written and answers read with orjson: the load generator shares the two cores with what
    it measures, and every µs it spends the model does not get (aiohttp: ~500 µs a job here).
    """
    import orjson

    loop = asyncio.get_running_loop()
    deadline = loop.time() + warmup_s + seconds
    completed: list[float] = []
    latencies: list[float] = []
    url = urlsplit(base)
    host = f"Host: {url.netloc}".encode()
    post = b"POST /v1/forecasts HTTP/1.1\r\n" + host + b"\r\nContent-Type: application/json"
    if prefer_wait:
        post += b"\r\nPrefer: wait=30"
    idle: list[LeanHTTP] = []

    async def one(key: int) -> None:
        started = time.monotonic()
        while idle and idle[-1].closed:  # closed by the server while idle (keep-alive timeout)
            idle.pop()
        http = idle.pop() if idle else await LeanHTTP.open(url.hostname, url.port)
        try:
            status, answer = await http.request(post, orjson.dumps(body(model, [series(length, key)])))
            job = orjson.loads(answer)
            while status in (200, 202) and job["status"] in ("queued", "running"):
                get = b"GET /v1/forecasts/%s?wait=30 HTTP/1.1\r\n%s" % (job["id"].encode(), host)
                status, answer = await http.request(get)
                job = orjson.loads(answer)
        except BaseException:
            http.close()
            raise
        assert status == 200 and job["status"] == "succeeded", (status, job)
        if not http.closed:
            idle.append(http)
        completed.append(time.monotonic())
        latencies.append(completed[-1] - started)

    try:
        if rate is None:

            async def client(k: int) -> None:
                i = 0
                while loop.time() < deadline:
                    await one(k * 100_000 + i)
                    i += 1

            await asyncio.gather(*(client(k) for k in range(clients)))
            return completed, latencies, 0
        running: set[asyncio.Task] = set()
        failed: list[BaseException] = []

        def ended(task: asyncio.Task) -> None:
            running.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())

        skipped, start = 0, loop.time()
        for i in range(int((warmup_s + seconds) * rate)):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            if len(running) >= clients:
                skipped += 1
                continue
            task = asyncio.create_task(one(i))
            running.add(task)
            task.add_done_callback(ended)
        await asyncio.gather(*running)
        if failed:  # a job that failed is no throughput: say so rather than print a lower figure
            raise RuntimeError(f"{len(failed)} jobs failed in the flood; the first: {failed[0]!r}")
        return completed, latencies, skipped
    finally:
        for http in idle:
            http.close()


def _cpu(stack, model: str) -> dict[str, float]:
    """CPU seconds so far: every API process, Redis, the worker (model and bookkeeping), this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    worker = {part: stack.worker_metric(model, "chronos_queue_worker_cpu_seconds_total", part=part)
              for part in ("model", "bookkeeping")}  # fmt: skip
    return {
        "api": cpu_seconds(stack.procs["api"].pid),
        "redis": cpu_seconds(stack.procs["redis"].pid, with_children=False),
        "worker model": worker["model"],
        "worker bookkeeping": worker["bookkeeping"],
        "load generator": usage.ru_utime + usage.ru_stime,
    }


def _env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def flood(args) -> None:
    with Stack([args.model], _env(args.worker_env), args.workers, api_env=_env(args.api_env)) as stack:
        print(
            f"{args.model}: raw pipeline in this process ({torch_threads()} torch threads), {LENGTH} points, horizon {HORIZON}"
        )
        raw = Raw(args.model, _env(args.worker_env).get("DTYPE", "auto"))  # the worker's dtype
        best_batch, raw_rate = raw.best([8, 16, 32, 64], LENGTH, HORIZON)
        del raw
        sums = [stack.worker_metric(args.model, f"chronos_queue_worker_batch_size_{s}") for s in ("sum", "count")]
        cpu: dict[str, dict[str, float]] = {}

        def snapshot(label: str) -> None:
            cpu[label] = _cpu(stack, args.model)
            cpu[label]["messages"] = stack.worker_metric(args.model, "chronos_queue_worker_messages_total")
            if label == "start":
                stack.redis.config_resetstat()  # Redis's time per command, from here to the end
            else:
                commands.update(stack.redis.info("commandstats"))

        commands: dict[str, dict] = {}
        timers = [threading.Timer(args.warmup + at, snapshot, (label,)) for at, label in ((0, "start"), (args.seconds, "end"))]
        for timer in timers:
            timer.start()
        started = time.monotonic()
        completed, latencies, skipped = asyncio.run(
            _flood(stack.base, args.model, args.clients, args.warmup, args.seconds, LENGTH, args.prefer_wait, args.rate)
        )
        measured = [i for i, t in enumerate(completed) if started + args.warmup <= t < started + args.warmup + args.seconds]
        window = [completed[i] for i in measured]
        spans = [latencies[i] for i in measured]
        served = len(window) / args.seconds
        after = [stack.worker_metric(args.model, f"chronos_queue_worker_batch_size_{s}") for s in ("sum", "count")]
        mean_batch = (after[0] - sums[0]) / max(1.0, after[1] - sums[1])
        # The machine drifts (here ±20 % within minutes): the raw pipeline again after the flood, at
        # the batch that did best before it, and the ratio against the mean of the two.
        raw_after = Raw(args.model, _env(args.worker_env).get("DTYPE", "auto")).throughput(best_batch, LENGTH, HORIZON)
        raw_mean = (raw_rate + raw_after) / 2
    load = f"open loop at {args.rate:g} jobs/s, at most {args.clients} in flight" if args.rate else f"{args.clients} clients"
    print(f"flood: {load}, one-series async jobs, {args.seconds:g}s measured after {args.warmup:g}s, "
          f"{args.workers} worker(s){', POST with Prefer: wait' if args.prefer_wait else ', POST then long-wait GET'}"
          f"{', worker ' + ' '.join(args.worker_env) if args.worker_env else ''}"
          f"{', API ' + ' '.join(args.api_env) if args.api_env else ''}")  # fmt: skip
    print(f"  raw best batched     {raw_mean:8.1f} series/s (batch {best_batch}: {raw_rate:.1f} before the flood, "
          f"{raw_after:.1f} after)")  # fmt: skip
    print(f"  served (HTTP→result) {served:8.1f} series/s, mean worker batch {mean_batch:.1f} series")
    print(f"  ratio served/raw     {served / raw_mean:8.2f}   (target >= 0.80)")
    print(f"  job latency (POST to result) p50 {1e3 * percentile(spans, 0.5):.0f} ms, p99 {1e3 * percentile(spans, 0.99):.0f} ms")
    if args.rate:
        print(f"  arrivals skipped with every client busy: {skipped} (any: the rate is above what is served)")
    jobs = max(1, len(window))
    spent = {part: cpu["end"][part] - cpu["start"][part] for part in cpu["start"]}
    print(f"  CPU per job in the window ({jobs} jobs), µs:")
    for part, target in (("api", 1000), ("worker bookkeeping", 150), ("redis", 100), ("worker model", None),
                         ("load generator", None)):  # fmt: skip
        goal = f"(target <= {target})" if target else ""
        print(f"    {part:20}{1e6 * spent[part] / jobs:10.0f}  {goal}")
    print(f"  jobs per queue message {jobs / max(1.0, spent['messages']):.1f}")
    top = sorted(commands.items(), key=lambda kv: -kv[1]["usec"])[:6]  # scripts' own commands counted in them too
    print("  Redis time in commands, µs per job: " + ", ".join(
        f"{name.removeprefix('cmdstat_')} {stats['usec'] / jobs:.0f} ({stats['calls'] / jobs:.1f} calls)" for name, stats in top
    ))  # fmt: skip


def sync(args) -> None:
    with Stack([args.model], _env(args.worker_env), api_env=_env(args.api_env)) as stack:
        quiet, quiet_legs = timed_predicts(stack.base, args.model, args.n, LENGTH, HORIZON)["httpx"]
        load = subprocess.Popen(
            [sys.executable, __file__, "_load", "--base", stack.base, "--model", args.model, "--clients", str(args.clients)],
            cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        try:
            time.sleep(5)  # let the flood fill the queue
            depth = httpx.get(f"{stack.base}/metrics", timeout=5).text
            served_before, t0 = stack.worker_metric(args.model, "chronos_queue_worker_series_total"), time.monotonic()
            loaded, loaded_legs = timed_predicts(stack.base, args.model, args.n, LENGTH, HORIZON)["httpx"]
            flood_rate = (
                stack.worker_metric(args.model, "chronos_queue_worker_series_total") - served_before - args.n
            ) / (time.monotonic() - t0)
        finally:
            os.killpg(load.pid, signal.SIGTERM)
            load.wait(30)
    backlog = [
        line for line in depth.splitlines() if line.startswith("chronos_queue_queue_depth{") and args.model in line
    ]
    print(f"sync: {args.model}, {LENGTH} points, horizon {HORIZON}, n={args.n} sequential /v1/predict")
    print(f"  {'':24}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, samples in (("no load", quiet), (f"under flood ({args.clients} clients)", loaded)):
        print(f"  {name:24}{1e3 * percentile(samples, 0.5):10.1f}{1e3 * percentile(samples, 0.99):10.1f}"
              f"{1e3 * statistics.fmean(samples):10.1f}")  # fmt: skip
    print(f"  queue during the flood: {'; '.join(backlog)}")
    print(f"  the flood's own series served meanwhile: {flood_rate:.1f} series/s")
    print(f"  where a call's time goes (median ms)  {'no load':>10}{'flood':>10}")
    for leg in quiet_legs:
        print(f"    {leg:34}{1e3 * quiet_legs[leg]:10.1f}{1e3 * loaded_legs[leg]:10.1f}")
    print(f"  ratio p50 flood/no load {percentile(loaded, 0.5) / percentile(quiet, 0.5):.2f}   (target <= 2)")


def _load(args) -> None:
    """A flood that runs until this process is told to stop (used by `sync`)."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(_flood(args.base, args.model, args.clients, 0, 3600, LENGTH, rate=args.rate))


def bulk(args) -> None:
    with Stack([args.model], _env(args.worker_env), api_env=_env(args.api_env)) as stack:
        print(f"{args.model}: raw pipeline in this process ({torch_threads()} torch threads)")
        raw = Raw(args.model, _env(args.worker_env).get("DTYPE", "auto"))  # the worker's dtype
        best_batch, raw_rate = raw.best(None, LENGTH, HORIZON)
        del raw
        payload = body(args.model, [series(LENGTH, k) for k in range(args.series)])
        with httpx.Client(base_url=stack.base, timeout=600) as http:
            started = time.perf_counter()
            job = http.post("/v1/forecasts", json=payload).json()
            accepted = time.perf_counter() - started
            while job["status"] in ("queued", "running"):
                job = http.get(f"/v1/forecasts/{job['id']}", params={"wait": 30}).json()
            total = time.perf_counter() - started
    assert job["status"] == "succeeded", job.get("error")
    served = args.series / total
    print(f"bulk: one job of {args.series} series x {LENGTH} points, horizon {HORIZON}")
    print(f"  raw best batched     {raw_rate:8.1f} series/s (batch {best_batch})")
    print(f"  served (POST→result) {served:8.1f} series/s: {total:.1f}s in all, {accepted:.1f}s to accept, "
          f"{job['timings']['inference_s']:.1f}s in the model")  # fmt: skip
    print(f"  ratio served/raw     {served / raw_rate:8.2f}   (target >= 0.9, against one prebuilt 2-D tensor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    f = commands.add_parser("flood")
    f.add_argument("--model", default="amazon/chronos-bolt-tiny")
    f.add_argument("--clients", type=int, default=128)
    f.add_argument("--seconds", type=float, default=20)
    f.add_argument("--warmup", type=float, default=5)
    f.add_argument("--workers", type=int, default=1, help="workers of the model (several may share one GPU)")
    f.add_argument("--prefer-wait", action="store_true", help="POST with `Prefer: wait`: one request per job")
    f.add_argument("--rate", type=float, help="open loop: start this many jobs a second (--clients caps those in flight)")
    s = commands.add_parser("sync")
    s.add_argument("--model", default="amazon/chronos-bolt-tiny")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--clients", type=int, default=64)
    b = commands.add_parser("bulk")
    b.add_argument("--model", default="amazon/chronos-bolt-small")
    b.add_argument("--series", type=int, default=10_000)
    for sub in (f, s, b):
        sub.add_argument("--worker-env", nargs="*", default=[], metavar="KEY=VALUE", help="worker settings to try")
        sub.add_argument("--api-env", nargs="*", default=[], metavar="KEY=VALUE", help="API settings to try")
    load = commands.add_parser("_load")
    load.add_argument("--base", required=True)
    load.add_argument("--model", required=True)
    load.add_argument("--clients", type=int, required=True)
    load.add_argument("--rate", type=float)
    args = parser.parse_args()
    {"flood": flood, "sync": sync, "bulk": bulk, "_load": _load}[args.command](args)


if __name__ == "__main__":
    main()
