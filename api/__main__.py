"""`python -m api [uvicorn options]`: the API server, as every launcher starts it (make run, the
containers, the tests and the benchmarks).

- One process per core unless WEB_CONCURRENCY says otherwise: parsing, validating and rendering
  series is CPU work, and one event loop with one GIL cannot keep a GPU host busy. Everything a
  process keeps is safe to have N times (api/events.py, api/callbacks.py: one consumer per process).
- Prometheus metrics of all the processes together: each writes its samples under
  PROMETHEUS_MULTIPROC_DIR (a fresh directory unless given), and /metrics, whichever process
  answers it, adds them up (api/metrics.py).
- Request headers under a deadline (api/protocol.py).
- No uvicorn access log unless `--access-log` is given: the audit log (api/audit.py) writes one
  line per request already, with more in it; a second line per request is CPU a flood pays for.
"""

from __future__ import annotations

import os
import sys
import tempfile


def main() -> None:
    if not os.environ.get("WEB_CONCURRENCY"):
        os.environ["WEB_CONCURRENCY"] = str(len(os.sched_getaffinity(0)))
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # set before prometheus_client is imported anywhere
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chronos-queue-metrics-")
    from uvicorn.main import main as uvicorn

    quiet = [] if "--access-log" in sys.argv else ["--no-access-log"]
    sys.argv = ["uvicorn", "--factory", "api.main:create_app", "--http", "api.protocol:HeaderDeadline", *quiet,
                *sys.argv[1:]]  # fmt: skip
    uvicorn()


if __name__ == "__main__":
    main()
