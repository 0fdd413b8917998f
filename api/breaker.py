"""The circuit breaker of each model, as the API applies it.

Workers count every run's outcome where it ends (lua/finish.lua): per model, `ok` and `failed` in
time buckets spanning BREAKER_WINDOW_S. When at least BREAKER_MIN_JOBS ended in the window and
the failed share reaches BREAKER_FAILURE_RATIO, the same script opens the model's circuit
(`keys.circuit`). While it is open, sync calls to the model are refused with 503
`model-unavailable` (or go down its fallback chain, api/routing.py). After BREAKER_COOLOFF_S, up
to BREAKER_PROBES calls at a time are let through (half-open, lua/probe.lua); the first success
closes the circuit, a failure opens it for another cool-off. The state lives in Redis, so every
API process sees the same circuit; each reads it with the model's heartbeats (api/fleet.py), so
a closed circuit costs no round trip of its own.
"""

from __future__ import annotations

import math
import time

from shared.catalog import ModelSpec
from shared.settings import Settings
from shared.store import AsyncJobStore, CircuitState

from api.problems import Problem

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN)


def state(circuit: CircuitState, cooloff_s: float, now: float | None = None) -> str:
    """What the circuit is now: an open one whose cool-off has passed takes probes, so it is half-open."""
    if circuit.state is None:
        return CLOSED
    now = time.time() if now is None else now
    if circuit.state == OPEN and now - circuit.since < cooloff_s:
        return OPEN
    return HALF_OPEN


async def passes(store: AsyncJobStore, spec: ModelSpec, circuit: CircuitState) -> bool:
    """Whether a call may go to the model: always while its circuit is closed, else only as a probe
    (one round trip, only while the circuit is not closed)."""
    return circuit.state is None or await store.probe(spec)


def unavailable(spec: ModelSpec, circuit: CircuitState, settings: Settings) -> Problem:
    """503 `model-unavailable`, with Retry-After the rest of the cool-off."""
    left = max(1, math.ceil(circuit.since + settings.breaker_cooloff_s - time.time()))
    return Problem(
        503,
        "model-unavailable",
        f"too many of {spec.id}'s recent jobs failed; its circuit is open, calls are refused for up to "
        f"{left}s (POST /v1/forecasts still queues jobs)",
        headers={"Retry-After": str(left)},
    )
