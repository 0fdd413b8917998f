"""The API's CPU per request, without the model: for changes to the API, where the flood's figures
drift with the model's passes and the machine.

    .venv/bin/python bench/api_cpu.py [--other DIR] [--rounds 4] [--seconds 6] [--connections 64]

Starts redis-server, a bolt-tiny worker and the API (bench/harness.py), runs one job to the end,
starts the API measured (`python -m api` of this tree, two processes on two cores), then stops the
worker, so nothing else spends CPU. Each round drives the API for `--seconds` with
`--connections` keep-alive connections in a closed loop, and reads the API processes' CPU time
from /proc:
- GET:  `GET /v1/forecasts/{id}` of the finished job (the *read* script's round trip, the answer
        rendered; the stack runs with AUTH_DISABLED, so no key is checked);
- POST: `POST /v1/forecasts` of one 512-point series (the body parsed and checked, the job
        created and its message sent; it stays queued).
With `--other DIR` (another checkout of the project, e.g. `git worktree add /tmp/base main`), that
tree's API, started alike, runs beside this one against the same Redis, and the rounds alternate
between the two (which goes first alternates too): µs per request of each, side by side, and their
ratio. Rounds differ by ±10-20 % on this shared 2-core VM: compare medians, not single rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from pathlib import Path

import httpx
import orjson

from harness import LeanHTTP, Stack, _ok, cpu_seconds, series, wait_until
from throughput import body

MODEL = "amazon/chronos-bolt-tiny"


async def _drive(port: int, request, seconds: float, connections: int) -> int:
    """Requests answered in `seconds`, `connections` clients each sending `request(client, i)` in turn."""
    answered, stop = 0, time.monotonic() + seconds

    async def client(k: int) -> None:
        nonlocal answered
        http = await LeanHTTP.open("127.0.0.1", port)
        i = 0
        try:
            while time.monotonic() < stop:
                status, answer = await http.request(*request(k, i))
                assert status in (200, 202), (status, answer[:300])
                answered, i = answered + 1, i + 1
        finally:
            http.close()

    await asyncio.gather(*(client(k) for k in range(connections)))
    return answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", help="another checkout whose API runs beside this one, rounds alternating")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    # Jobs pile up queued: no cap on them (POST rounds make ~1,000 a second).
    limits = {"MAX_QUEUE_DEPTH": "0", "MAX_IN_FLIGHT": "0"}
    with Stack([MODEL], api_env=limits) as stack:
        job = httpx.post(f"{stack.base}/v1/forecasts", json=body(MODEL, [series(512, 1)]),
                         headers={"Prefer": "wait=60"}, timeout=90).json()  # fmt: skip
        assert job["status"] == "succeeded", job
        # Both measured APIs start alike, so that only their code differs (the stack's own API ran
        # the job and answered the harness; rounds differ by ±10-20 % here).
        apis = {"this": stack.start_api(limits, "api-this")}
        if args.other:
            apis["other"] = stack.start_api(limits, "api-other", root=Path(args.other))
        for side, base in apis.items():
            wait_until(lambda base=base: _ok(f"{base}/readyz"), f"the API of {side}")
        stack.kill(f"worker-{stack.specs[0].slug}")  # from here only the API and Redis work
        get = b"GET /v1/forecasts/%s HTTP/1.1\r\nHost: api" % job["id"].encode()
        post = b"POST /v1/forecasts HTTP/1.1\r\nHost: api\r\nContent-Type: application/json"
        keys = itertools.count(2)
        requests = {
            "GET": lambda k, i: (get, b""),
            # A series of its own each: no answer from the cache, no single-flight join.
            "POST": lambda k, i: (post, orjson.dumps(body(MODEL, [series(512, next(keys))]))),
        }
        spent: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for kind, request in requests.items():
                sides = list(apis) if r % 2 == 0 else list(reversed(apis))
                for side in sides:
                    pid, port = stack.procs[f"api-{side}"].pid, int(apis[side].rsplit(":", 1)[1])
                    before = cpu_seconds(pid)
                    n = asyncio.run(_drive(port, request, args.seconds, args.connections))
                    spent.setdefault((kind, side), []).append(1e6 * (cpu_seconds(pid) - before) / n)
                    print(f"  round {r + 1} {kind:4} {side:5}: {n / args.seconds:7.0f} requests/s, "
                          f"{spent[kind, side][-1]:6.0f} µs of API CPU a request", flush=True)  # fmt: skip
    print(f"API CPU per request, median of {args.rounds} rounds ({args.connections} connections, {args.seconds:g} s each):")
    for kind in requests:
        this = statistics.median(spent[kind, "this"])
        line = f"  {kind:4}  this tree {this:6.0f} µs"
        if args.other:
            theirs = statistics.median(spent[kind, "other"])
            line += f"   other tree {theirs:6.0f} µs   this/other {this / theirs:.2f}"
        print(line)


if __name__ == "__main__":
    main()
