"""The data path's CPU cost, side by side in one run (issue 13): what would starve a GPU.

    .venv/bin/python bench/dataplane.py [--model amazon/chronos-bolt-tiny] [--series 10000] [--memory-series 100000]

1. accept:  a 10,000 x 512 job, time from sending the request to its 202, as JSON and as Arrow.
2. worker:  for the same job, (accepted -> result stored) minus the time in forward passes, per
            series; and the job's throughput against the raw pipeline fed one prebuilt 2-D tensor.
3. results: fetching that job's forecasts, as JSON and as Arrow.
4. memory:  Redis bytes per queued series (a job for a model no worker serves), and the worker's
            peak RSS after a 10,000- and after a --memory-series job of short (64-point) series.

Starts its own redis-server, API and worker (bench/harness.py) and stops them after.
"""

from __future__ import annotations

import argparse
import io
import time

import httpx
import pyarrow as pa

from harness import Raw, Stack, series, torch_threads

LENGTH, HORIZON = 512, 20
ARROW = "application/vnd.apache.arrow.stream"


def json_body(model: str, n: int, length: int) -> bytes:
    import orjson

    return orjson.dumps({"model": model, "inputs": [{"item_id": f"s{k}", "target": series(length, k)} for k in range(n)],
                         "parameters": {"prediction_length": HORIZON}})  # fmt: skip


def arrow_body(n: int, length: int) -> bytes:
    import numpy as np

    values = np.array([series(length, k) for k in range(n)], dtype=np.float32).reshape(-1)
    ends = pa.array(np.arange(1, n + 1, dtype=np.int32) * length)
    ids = pa.RunEndEncodedArray.from_arrays(ends, pa.array([f"s{k}" for k in range(n)]))  # as the client sends them
    table = pa.table({"item_id": ids, "target": values})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def timed(call):
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def wait(http: httpx.Client, job_id: str) -> dict:
    while True:
        job = http.get(f"/v1/forecasts/{job_id}", params={"wait": 30}, headers={"Accept": "application/json"})
        job = job.json()
        if job["status"] not in ("queued", "running"):
            return job


def rss_peak_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_pid(stack: Stack) -> int:
    import subprocess

    leader = stack.procs[f"worker-{stack.specs[0].slug}"].pid
    children = subprocess.run(["pgrep", "-g", str(leader)], capture_output=True, text=True).stdout.split()
    return max(int(c) for c in children) if children else leader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="amazon/chronos-bolt-tiny")
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--memory-series", type=int, default=100_000)
    args = parser.parse_args()
    n = args.series
    with Stack([args.model]) as stack:
        print(f"{args.model}: raw pipeline in this process ({torch_threads()} torch threads), {LENGTH} points, horizon {HORIZON}")
        raw = Raw(args.model)
        best_batch, raw_rate = raw.best(None, LENGTH, HORIZON)
        del raw
        body_json, body_arrow = json_body(args.model, n, LENGTH), arrow_body(n, LENGTH)
        with httpx.Client(base_url=stack.base, timeout=900) as http:
            # 1. accept, JSON then Arrow (each job then runs to its end before the next is sent)
            answer, accept_json = timed(lambda: http.post("/v1/forecasts", content=body_json,
                                                          headers={"content-type": "application/json"}))  # fmt: skip
            assert answer.status_code == 202, answer.text
            job = wait(http, answer.json()["id"])
            assert job["status"] == "succeeded", job.get("error")
            query = {"model": args.model, "prediction_length": HORIZON}
            answer, accept_arrow = timed(lambda: http.post("/v1/forecasts", params=query, content=body_arrow,
                                                           headers={"content-type": ARROW}))  # fmt: skip
            assert answer.status_code == 202, answer.text
            job2 = wait(http, answer.json()["id"])
            assert job2["status"] == "succeeded", job2.get("error")
            # 2. worker time outside the model, from the record's own clock
            outside = [(j["finished_at"] - j["created_at"]) - j["timings"]["inference_s"] for j in (job, job2)]
            served = [n / (j["finished_at"] - j["created_at"]) for j in (job, job2)]
            # 3. results out
            out_json, get_json = timed(lambda: http.get(f"/v1/forecasts/{job['id']}"))
            out_arrow, get_arrow = timed(lambda: http.get(f"/v1/forecasts/{job['id']}", headers={"Accept": ARROW}))
            assert len(out_json.json()["predictions"]) == n
            assert pa.ipc.open_stream(out_arrow.content).read_all().num_rows == n * HORIZON
            # 4. memory: a job nobody serves stays queued; then the worker's peak RSS on growing jobs
            idle = "amazon/chronos-bolt-mini"
            before = stack.redis.info("memory")["used_memory"]
            queued = http.post("/v1/forecasts", params={**query, "model": idle}, content=body_arrow,
                               headers={"content-type": ARROW}).json()  # fmt: skip
            per_series = (stack.redis.info("memory")["used_memory"] - before) / n
            http.delete(f"/v1/forecasts/{queued['id']}")
            pid = worker_pid(stack)
            peaks = []
            for size in (n, args.memory_series):
                small = arrow_body(size, 64)
                job3 = http.post("/v1/forecasts", params=query, content=small, headers={"content-type": ARROW}).json()
                assert wait(http, job3["id"])["status"] == "succeeded"
                peaks.append((size, rss_peak_mb(pid)))
    print(f"dataplane: one job of {n} series x {LENGTH} points, horizon {HORIZON}")
    print(f"  raw, one 2-D tensor      {raw_rate:9.1f} series/s (batch {best_batch})")
    print(f"  1. accept (send -> 202)  JSON {len(body_json) / 1e6:.1f} MB: {accept_json:6.3f} s (target <= 0.5)   "
          f"Arrow {len(body_arrow) / 1e6:.1f} MB: {accept_arrow:6.3f} s (target <= 0.1)")
    for name, out, rate in zip(("JSON job ", "Arrow job"), outside, served, strict=True):
        print(f"  2. worker outside model  {name}: {out:6.3f} s = {1e6 * out / n:6.1f} us/series (target <= 20); "
              f"served {rate:7.1f} series/s = {rate / raw_rate:.2f} of raw (target >= 0.9)")
    print(f"  3. results out           JSON {len(out_json.content) / 1e6:.1f} MB: {get_json:6.3f} s (target <= 0.3)   "
          f"Arrow {len(out_arrow.content) / 1e6:.1f} MB: {get_arrow:6.3f} s")
    print(f"  4. memory                Redis {per_series:.0f} bytes per queued series ({LENGTH} points); worker peak RSS "
          + ", ".join(f"{mb:.0f} MB after a {size}-series job" for size, mb in peaks))


if __name__ == "__main__":
    main()
