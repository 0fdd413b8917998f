"""Load with faults: nothing accepted may be lost.

    .venv/bin/python bench/chaos.py [--clients 32] [--seconds 60] [--model amazon/chronos-bolt-tiny]

Starts Redis with its append-only file on (as compose runs it), the API and two workers for the
model, then runs N concurrent clients for the given time, mixing synchronous `/v1/predict`
calls (one in three) and async jobs (POST, then long-wait). Meanwhile it SIGKILLs one worker
and starts it again, restarts Redis (SIGTERM, as an operator or `docker compose restart` does)
and SIGKILLs the other worker. Clients retry whatever was refused (429/503, connection errors).
When the load stops, every job the service accepted (202 or 200) is followed to its end. It
prints accepted, succeeded, failed, lost (must be 0) and the latency of accepted requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter

import aiohttp

from harness import Stack, percentile, series

TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


class Load:
    def __init__(self, base: str, model: str):
        self.base, self.model = base, model
        self.accepted: dict[str, dict] = {}  # job id -> {"kind", "sent", "done", "status"}
        self.refused = Counter()
        self.started = time.time()

    async def run(self, clients: int, seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(self.base, timeout=timeout) as http:
            await asyncio.gather(*(self._client(http, k, deadline) for k in range(clients)))

    async def _client(self, http: aiohttp.ClientSession, k: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        i = 0
        while loop.time() < deadline:
            i += 1
            sync = i % 3 == 0
            body = {"model": self.model, "inputs": [{"target": series(256, k * 100_000 + i)}],
                    "parameters": {"prediction_length": 12}}  # fmt: skip
            path, params = ("/v1/predict", {"timeout": "10"}) if sync else ("/v1/forecasts", {})
            sent = time.monotonic()
            try:
                async with http.post(path, json=body, params=params) as r:
                    status, job = r.status, await r.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.refused[type(exc).__name__] += 1
                await asyncio.sleep(0.3)
                continue
            if status not in (200, 202) and not job.get("job_id"):
                self.refused[f"{status} {job.get('code')}"] += 1
                await asyncio.sleep(0.3)
                continue
            job_id = job.get("id") or job["job_id"]
            self.accepted[job_id] = {"kind": "sync" if sync else "async", "sent": sent, "status": job.get("status")}
            await self.follow(http, job_id, loop.time() + 120)

    async def follow(self, http: aiohttp.ClientSession, job_id: str, until: float) -> None:
        """Long-wait on a job until it ends (or `until`), riding out refusals and Redis restarts."""
        entry = self.accepted[job_id]
        loop = asyncio.get_running_loop()
        while entry["status"] not in TERMINAL and loop.time() < until:
            try:
                async with http.get(f"/v1/forecasts/{job_id}", params={"wait": "20"}) as r:
                    job = await r.json(content_type=None)
                    if r.status == 200:
                        entry["status"] = job["status"]
                    elif r.status == 404:
                        entry["status"] = "missing"
                        return
                    else:
                        await asyncio.sleep(0.3)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.sleep(0.3)
        if entry["status"] in TERMINAL and "done" not in entry:
            entry["done"] = time.monotonic()

    async def audit(self, seconds: float) -> None:
        """Follow every accepted job that has not ended yet."""
        until = asyncio.get_running_loop().time() + seconds
        async with aiohttp.ClientSession(self.base, timeout=aiohttp.ClientTimeout(total=60)) as http:
            await asyncio.gather(*(self.follow(http, job_id, until) for job_id, e in self.accepted.items()
                                   if e["status"] not in TERMINAL))  # fmt: skip


async def chaos(stack: Stack, slug: str, load_s: float) -> list[str]:
    """The fault schedule, spread over the load; returns what happened when."""
    events, started = [], time.monotonic()

    async def at(fraction: float, what: str, action) -> None:
        await asyncio.sleep(max(0.0, started + fraction * load_s - time.monotonic()))
        await asyncio.to_thread(action)
        events.append(f"t={time.monotonic() - started:5.1f}s {what}")

    await at(0.15, f"SIGKILL worker-{slug}", lambda: stack.kill(f"worker-{slug}"))
    await at(0.25, f"start worker-{slug} again", lambda: stack.start_worker(stack.specs[0].id, f"worker-{slug}"))
    await at(0.45, "restart Redis (SIGTERM, 2 s down)", stack.restart_redis)
    await at(0.65, f"SIGKILL worker-{slug}-1", lambda: stack.kill(f"worker-{slug}-1"))
    await at(0.75, f"start worker-{slug}-1 again", lambda: stack.start_worker(stack.specs[0].id, f"worker-{slug}-1"))
    return events


async def main_async(args) -> None:
    with Stack([args.model], workers_per_model=2, aof=True) as stack:
        load = Load(stack.base, args.model)
        load.started = time.time()
        events, _ = await asyncio.gather(
            chaos(stack, stack.specs[0].slug, args.seconds), load.run(args.clients, args.seconds)
        )
        await load.audit(180)
        stranded = [job_id for job_id, e in load.accepted.items() if e["status"] not in TERMINAL]
        where = _where(stack, stranded, load.started)
    outcomes = Counter(e["status"] for e in load.accepted.values())
    lost = sum(n for status, n in outcomes.items() if status not in TERMINAL)
    print(f"chaos: {args.model}, 2 workers, {args.clients} clients for {args.seconds:g}s (1 in 3 sync), Redis AOF on")
    for event in events:
        print(f"  {event}")
    print(f"  accepted  {len(load.accepted)}  ({sum(e['kind'] == 'sync' for e in load.accepted.values())} sync)")
    print(f"  outcomes  {dict(outcomes)}")
    print(f"  refused   {dict(load.refused)} (retried by the clients; not accepted)")
    print(f"  lost      {lost}   (accepted, then missing or never finished; must be 0)")
    for line in where:
        print(f"    {line}")
    for kind in ("sync", "async"):
        spans = [e["done"] - e["sent"] for e in load.accepted.values() if e["kind"] == kind and "done" in e]
        if spans:
            print(
                f"  {kind:5} latency p50 {1e3 * percentile(spans, 0.5):7.1f} ms   p99 {1e3 * percentile(spans, 0.99):8.1f} ms"
            )


def _where(stack: Stack, job_ids: list[str], started_at: float) -> list[str]:
    """For jobs that never finished: their record, and whether their message is queued or held."""
    from shared.celery_app import job_ids as carried
    from shared.store import keys

    held = {j for m in stack.redis.hvals(keys.KOMBU_UNACKED) for j in carried(json.loads(m)[0])}
    queued = {
        j for spec in stack.specs for q in keys.worker_queues(spec) for m in stack.redis.lrange(q, 0, -1)
        for j in carried(json.loads(m))
    }  # fmt: skip
    lines = []
    for job_id in job_ids:
        rec = stack.redis.hgetall(keys.job(job_id))
        lines.append(f"{job_id}: status {rec.get('status')}, lane {rec.get('lane')}, attempts {rec.get('attempts')}, "
                     f"accepted at t={float(rec.get('created_at', 0)) - started_at:.1f}s, "
                     f"after start, message {'held (unacked)' if job_id in held else 'queued' if job_id in queued else 'nowhere'}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="amazon/chronos-bolt-tiny")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
