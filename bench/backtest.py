"""The evaluation client's 250-day run: 250 compat HTTP calls four at a time vs one backtest job.

Same model, same stack, same run, alternating rounds. The client's pattern (docs/api.md, compat routes): one
`POST /models/<slug>/v1/timeseries/forecast` per trading day, each with the last 252 points and a
20-step horizon, 4 in flight. The backtest sends the series once (`POST /v1/backtests`, origins
252 … 501) and long-waits on the job. The result cache is off (harness), so both run the model.

    .venv/bin/python bench/backtest.py [--model amazon/chronos-bolt-tiny] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from harness import Stack, series

CONTEXT, HORIZON, DAYS, PARALLEL = 252, 20, 250, 4


async def per_day(base: str, slug: str, history: list[float]) -> tuple[float, list[list[float]]]:
    gate = asyncio.Semaphore(PARALLEL)
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:

        async def day(i: int) -> list[float]:
            async with gate:
                answer = await http.post(
                    f"/models/{slug}/v1/timeseries/forecast",
                    json={"name": "SPY", "context_period_size": CONTEXT, "forecast_period_size": HORIZON,
                          "recent_data": history[i : i + CONTEXT]},
                )  # fmt: skip
                answer.raise_for_status()
                return answer.json()["forecast"]

        started = time.perf_counter()
        forecasts = await asyncio.gather(*(day(i) for i in range(DAYS)))
        return time.perf_counter() - started, forecasts


def one_job(base: str, model: str, history: list[float]) -> tuple[float, dict]:
    body = {
        "model": model,
        "series": {"item_id": "SPY", "target": history},
        "origins": {"first": CONTEXT, "last": CONTEXT + DAYS - 1, "step": 1},
        "context_length": CONTEXT,
        "parameters": {"prediction_length": HORIZON, "quantile_levels": [0.1, 0.5, 0.9]},
    }
    with httpx.Client(base_url=base, timeout=300) as http:
        started = time.perf_counter()
        job = http.post("/v1/backtests", json=body).raise_for_status().json()
        while job["status"] in ("queued", "running"):
            job = http.get(f"/v1/backtests/{job['id']}", params={"wait": 60}).raise_for_status().json()
        elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise SystemExit(f"backtest {job['status']}: {job.get('error')}")
    t = job["timings"]
    print(
        f"  job: queued {t['queued_s']:.3f}s, in the model {t['inference_s']:.3f}s, accepted→finished {t['total_s']:.3f}s"
    )
    return elapsed, job["backtest"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="amazon/chronos-bolt-tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    history = series(CONTEXT + DAYS + HORIZON)
    with Stack([args.model], worker_env=dict(e.split("=", 1) for e in args.worker_env)) as stack:
        slug = stack.specs[0].slug
        calls, jobs = [], []
        for r in range(args.rounds):
            calls_s, forecasts = asyncio.run(per_day(stack.base, slug, history))
            job_s, result = one_job(stack.base, args.model, history)
            calls.append(calls_s)
            jobs.append(job_s)
            print(f"round {r + 1}: {DAYS} calls x{PARALLEL} {calls_s:6.2f}s   one backtest job {job_s:6.2f}s")
        # The same forecasts either way (up to the float noise of batching): the job is the same work.
        worst = max(abs(a - b) for day, fc in zip(result["forecasts"], forecasts, strict=True)
                    for a, b in zip(day["0.5"], fc, strict=True))  # fmt: skip
    calls_s, job_s = statistics.median(calls), statistics.median(jobs)
    print(f"\n{args.model}, {DAYS} origins, context {CONTEXT}, horizon {HORIZON} (median of {args.rounds} rounds)")
    print(f"  {DAYS} HTTP calls, {PARALLEL} at a time  {calls_s:7.2f}s  ({DAYS / calls_s:6.1f} forecasts/s)")
    print(f"  one backtest job              {job_s:7.2f}s  ({DAYS / job_s:6.1f} forecasts/s)")
    print(f"  ratio calls/job               {calls_s / job_s:7.1f}x   (target >= 10x)")
    print(f"  largest median difference, job vs calls: {worst:.2e}")
    print(f"  job metrics: {result['metrics']}")


if __name__ == "__main__":
    main()
