"""Celery workers, each pinned to one Chronos model. Only this side imports torch and chronos."""

import os

# How long torch's OpenMP threads spin waiting for the next parallel region before they sleep:
# libgomp reads it once, when torch loads it, so it is set here, before any worker module imports
# torch (an operator's own setting wins). libgomp's default, 300,000 rounds, kept the model's team
# spinning while the API, Redis and the rest of the worker waited for the cores: flood on 2 cores,
# alternating runs, 412 / 416 series/s and 3815 µs of worker CPU a job at the default against
# 442 / 442 and 3221 / 3235 at 3,000. A pass alone did not change beyond noise (bench/README.md).
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
