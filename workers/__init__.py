"""Celery workers, each pinned to one Chronos model. Only this side imports torch and chronos."""

import os


def spin_briefly() -> None:
    """How long torch's OpenMP threads spin, waiting for the next parallel region, before they
    sleep: libgomp reads GOMP_SPINCOUNT once, as torch loads it, so a serving worker calls this
    before it imports torch (`python -m workers`; an operator's own setting wins). At libgomp's
    default, 300,000 rounds, the model's team kept spinning while the API, Redis and the rest of
    the worker waited for the cores: flood on 2 cores, alternating runs, 412 / 416 series/s and
    3815 µs of worker CPU a job at the default against 442 / 442 and 3221 / 3235 at 3,000. A
    pass alone did not change beyond noise (bench/README.md). Training workers keep the default:
    not measured there."""
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
