"""The result cache: an identical request to a deterministic model is answered from Redis.

Identical means the same model, the same weights revision (what every worker of the model
reports in its heartbeat), and the same inputs and parameters. Bolt and Chronos-2 are
deterministic; T5 samples, so a T5 request is cached only when it fixes `seed`. Workers
store a succeeded job's result under its key (`keys.cache`) for CACHE_TTL_S; the API
looks the key up before queueing and answers a hit at once, marked `cached`. The same
requests, while a job for one is still queued or running, share that job (api/flight.py).
"""

from __future__ import annotations

import hashlib
import json

from shared.catalog import ModelSpec


def parameters_of(payload: dict) -> dict:
    """A job payload's forecast parameters (a backtest nests them in its request)."""
    return (payload.get("backtest") or payload)["parameters"]


def cacheable(spec: ModelSpec, payload: dict) -> bool:
    return not spec.sample_based or parameters_of(payload).get("seed") is not None


def digest(spec: ModelSpec, revision: str, payload: dict) -> str:
    """What identifies a result: model, weights revision, and the payload (inputs and parameters)."""
    canonical = json.dumps([spec.id, revision, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
