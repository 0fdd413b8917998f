"""`python -m workers [--train]`: start a Celery worker for the model named by CHRONOS_MODEL (with
`--train` or TRAIN=true, a training worker: it runs the model's fine-tuning jobs only)."""

from __future__ import annotations

import os
import sys

from shared import catalog
from shared.settings import get_settings

from workers import spin_briefly


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    if not settings.chronos_model:
        sys.exit("CHRONOS_MODEL is not set: a worker serves exactly one catalog model (e.g. amazon/chronos-bolt-tiny)")
    extra = sys.argv[1:] if argv is None else argv
    train = settings.train or "--train" in extra
    if not train:
        spin_briefly()  # before torch loads (workers.app imports it)
    from workers.app import Worker
    from workers.weights import WeightsNotFound

    try:
        worker = Worker(settings, catalog.get(settings.chronos_model), train=train)
    except WeightsNotFound as exc:  # resolved before Celery starts (the worker's revision names a queue)
        sys.exit(str(exc))
    # A unique node name per process, so several workers of one model can share a host.
    args = [
        "worker",
        f"--hostname={worker.spec.slug}{'-train' if train else ''}-{os.getpid()}@%h",
        # Threads, not processes: every slot's job feeds the one model this process holds (workers/batcher.py).
        f"--concurrency={worker.slots()}",
        "--pool=threads",
        "--loglevel=INFO",
        *(a for a in extra if a != "--train"),
    ]
    worker.app.worker_main(args)


if __name__ == "__main__":
    main()
