"""Sync-path overhead: `/v1/predict` end to end vs a direct `predict_quantiles` call, in one run.

    .venv/bin/python bench/predict_latency.py [--model amazon/chronos-bolt-tiny] [--n 300]

Starts its own redis-server (free loopback port), one worker (`python -m workers`, synthetic
weights of the full architecture) and the API under uvicorn (bench/harness.py), then times N
sequential requests of one 512-point series, horizon 20, against N direct calls on the same
checkpoint in this process (half before, half after). Two clients take turns, 50 calls each: httpx
(the project's client's library, client/api.py), whose overhead the target is for, and the
standard library's http.client (what `requests` uses), which shows what the client library costs.
Prints p50/p99 of each, the overheads, and where a served request's time goes. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

from harness import Raw, Stack, percentile, series, timed_predicts, torch_threads


def direct(raw: Raw, n: int, length: int, horizon: int) -> list[float]:
    target = raw.torch.tensor([series(length)], dtype=raw.torch.float32)
    samples = []
    for i in range(n + 10):
        started = time.perf_counter()
        raw.call(target, horizon)
        if i >= 10:
            samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="amazon/chronos-bolt-tiny")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--horizon", type=int, default=20)
    args = parser.parse_args()
    with Stack([args.model]) as stack:
        raw = Raw(args.model)
        before = direct(raw, args.n // 2, args.length, args.horizon)
        timed = timed_predicts(stack.base, args.model, args.n, args.length, args.horizon, ("httpx", "http.client"))
        (served, legs), (stdlib, _) = timed["httpx"], timed["http.client"]
        after = direct(raw, args.n // 2, args.length, args.horizon)
    direct_all = before + after
    print(f"model {args.model} (synthetic weights, full architecture), 1 series x {args.length} points, "
          f"horizon {args.horizon}, n={args.n}, torch threads={torch_threads()}")  # fmt: skip
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    rows = (("direct predict_quantiles", direct_all), ("POST /v1/predict (httpx)", served),
            ("POST /v1/predict (http.client)", stdlib))  # fmt: skip
    for name, samples in rows:
        print(f"{name:28}{1e3 * percentile(samples, 0.5):10.2f}{1e3 * percentile(samples, 0.99):10.2f}"
              f"{1e3 * statistics.fmean(samples):10.2f}")  # fmt: skip
    print("where a served request's time goes (httpx, median ms):")
    for leg, seconds in legs.items():
        print(f"  {leg:34}{1e3 * seconds:8.2f}")
    overhead = percentile(served, 0.5) - percentile(direct_all, 0.5)
    print(f"p50 overhead: {1e3 * overhead:.2f} ms  (target <= 5 ms)  "
          f"ratio served/direct p50: {percentile(served, 0.5) / percentile(direct_all, 0.5):.2f}")  # fmt: skip
    # The same service under the standard library's client: what the client library itself costs.
    print(f"p50 overhead with http.client: {1e3 * (percentile(stdlib, 0.5) - percentile(direct_all, 0.5)):.2f} ms")


if __name__ == "__main__":
    main()
