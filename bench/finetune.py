"""A LoRA fine-tune of the full-size (synthetic) Chronos-2 as a queued job vs `fit` called directly.

Same checkpoint, same series, same settings, same machine, alternating rounds: `Chronos2Pipeline.fit`
in this process, then `POST /v1/finetunes` to a training worker (`python -m workers --train`)
and a long-wait until it ends. The job skips validation (`validation: false`), as the direct call
does none; the model load is outside both (the worker loads once at start). Printed: wall time
and steps/s of each, and what the queue costs on top of `fit` (the issue's bound: 5%): the job's
wall time from the POST to its end (upload, queue, claim, reading the series, the training
worker's bookkeeping per step, publishing the weights) over the direct call's.

    .venv/bin/python bench/finetune.py [--steps 20] [--rounds 2] [--series 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import httpx
import numpy as np

from harness import SYNTHETIC, Stack

MODEL = "amazon/chronos-2"
LENGTH, HORIZON, CONTEXT = 512, 16, 256


def series(n: int) -> list[list[float]]:
    return [[20 + 6 * math.sin(t / (3 + k % 7)) + (t % (4 + k % 5)) for t in range(LENGTH)] for k in range(n)]


def direct(data: list[list[float]], steps: int, batch_size: int) -> float:
    """Seconds of one `fit` on the checkpoint the training worker serves, in this process."""
    from chronos import BaseChronosPipeline

    from shared import catalog
    from shared.settings import Settings
    from workers.weights import resolve

    spec = catalog.get(MODEL)
    weights = resolve(spec, Settings(_env_file=None, weights="synthetic", synthetic_dir=str(SYNTHETIC)))
    pipeline = BaseChronosPipeline.from_pretrained(weights.path, device_map="cpu")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        pipeline.fit(
            [np.array(s, dtype=np.float32) for s in data], prediction_length=HORIZON, finetune_mode="lora",
            context_length=CONTEXT, learning_rate=1e-5, num_steps=steps, batch_size=batch_size, output_dir=out,
            remove_printer_callback=True, report_to=[], logging_steps=1, disable_tqdm=True, save_strategy="no",
        )  # fmt: skip
        return time.perf_counter() - started


def queued(base: str, data: list[list[float]], steps: int, batch_size: int) -> tuple[float, float]:
    """Seconds from the POST to the job's end, and the training worker's own `fit` seconds."""
    body = {
        "model": MODEL,
        "inputs": [{"item_id": f"s{k}", "target": s} for k, s in enumerate(data)],
        "parameters": {"prediction_length": HORIZON, "context_length": CONTEXT, "num_steps": steps,
                       "batch_size": batch_size, "learning_rate": 1e-5, "validation": False},
    }  # fmt: skip
    with httpx.Client(base_url=base, timeout=600) as http:
        started = time.perf_counter()
        job = http.post("/v1/finetunes", json=body).raise_for_status().json()
        while job["status"] in ("queued", "running"):
            job = http.get(f"/v1/finetunes/{job['id']}", params={"wait": 30}).raise_for_status().json()
        wall = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"fine-tuning job {job['id']} {job['status']}: {job.get('error')}")
    return wall, job["timings"]["inference_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--series", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    data = series(args.series)
    rows = []
    with Stack([], trainers=[MODEL]) as stack:
        for _ in range(args.rounds):
            alone = direct(data, args.steps, args.batch_size)
            wall, inside = queued(stack.base, data, args.steps, args.batch_size)
            rows.append((alone, wall, inside))
            print(f"direct fit {alone:7.1f} s ({args.steps / alone:.2f} steps/s) | job {wall:7.1f} s "
                  f"({args.steps / wall:.2f} steps/s; fit inside the worker {inside:.1f} s) | "
                  f"queue cost {100 * (wall / alone - 1):+.1f}%", flush=True)  # fmt: skip
    alone, wall, inside = (statistics.median(column) for column in zip(*rows, strict=True))
    print(f"\nLoRA, {args.steps} steps, batch {args.batch_size}, {args.series} series x {LENGTH} points, "
          f"context {CONTEXT}, horizon {HORIZON}, CPU; medians of {args.rounds} rounds:")  # fmt: skip
    print(f"  fit called directly   {alone:7.1f} s   {args.steps / alone:.3f} steps/s")
    print(f"  as a queued job       {wall:7.1f} s   {args.steps / wall:.3f} steps/s   (fit inside: {inside:.1f} s)")
    print(f"  job / direct          {wall / alone:.3f}   (the queue's cost: {100 * (wall / alone - 1):+.1f}%; bound +5%)")


if __name__ == "__main__":
    main()
