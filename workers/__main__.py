"""`python -m workers`: start a Celery worker for the model named by CHRONOS_MODEL."""

from __future__ import annotations

import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> None:
    # Metrics from the pool processes reach this process's /metrics through files in a directory of
    # its own, which prometheus_client must know before it is first imported (see workers/metrics.py).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=f"chronos-queue-metrics-{os.getpid()}-")
    from workers.app import app, settings, spec

    if spec is None:
        sys.exit("CHRONOS_MODEL is not set: a worker serves exactly one catalog model (e.g. amazon/chronos-bolt-tiny)")
    # A unique node name per process, so several workers of one model can share a host.
    args = [
        "worker",
        f"--hostname={spec.slug}-{os.getpid()}@%h",
        f"--concurrency={settings.worker_concurrency}",
        "--pool=prefork",
        "--loglevel=INFO",
        *(sys.argv[1:] if argv is None else argv),
    ]
    app.worker_main(args)


if __name__ == "__main__":
    main()
