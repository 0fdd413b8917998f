"""The result cache: an identical request to a deterministic model is answered from Redis.

Identical means the same model, the same weights revision (what every worker of the model
reports in its heartbeat), and the same series and parameters (`identity`, which the API
computes once per request). Only a request the model's family calls `cacheable`
(shared/families.py) is cached: a deterministic model's (Bolt, Chronos-2), or a seeded one's
(T5, which samples). Workers copy a succeeded job's output list and fields under
its key (`keys.cache`, `keys.cache_output`) for CACHE_TTL_S; the API looks the key up before
queueing and answers a hit at once, marked `cached`. The same
requests, while a job for one is still queued or running, share that job (single-flight, api/service.py).
"""

from __future__ import annotations

import hashlib

from shared.catalog import ModelSpec


def digest(spec: ModelSpec, revision: str, identity: str) -> str:
    """What identifies a result: model, weights revision, and the request's identity (series and parameters)."""
    return hashlib.sha256(f"{spec.id}\0{revision}\0{identity}".encode()).hexdigest()
