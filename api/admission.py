"""Who may submit now: each owner's submission rate (token bucket), jobs in flight, and the queue
depth cap. Every key has its own limits; keyless legacy calls share one set (LEGACY_*)."""

from __future__ import annotations

import math
from typing import NamedTuple

from shared.catalog import ModelSpec
from shared.settings import Settings
from shared.store import AsyncJobStore, Lane, keys

from api.auth import LEGACY
from api.problems import Problem


class OwnerLimits(NamedTuple):
    rate_per_s: float
    burst: int
    max_in_flight: int
    who: str  # how problem details name the owner
    in_flight_setting: str


class Admission:
    def __init__(self, settings: Settings, store: AsyncJobStore):
        self.settings, self.store = settings, store

    def limits(self, owner: str) -> OwnerLimits:
        s = self.settings
        if owner == LEGACY:
            return OwnerLimits(s.legacy_rate_limit_per_s, s.legacy_rate_limit_burst, s.legacy_max_in_flight,
                               "keyless legacy calls", "LEGACY_MAX_IN_FLIGHT")  # fmt: skip
        return OwnerLimits(s.rate_limit_per_s, s.rate_limit_burst, s.max_in_flight, "this key", "MAX_IN_FLIGHT")

    async def admit(self, owner: str) -> None:
        """The owner's submission rate limit (429). Routes take the token before they read a body, so
        a caller over its rate costs no parsing. The queue-depth and in-flight caps are checked by the
        job store as it creates the job (`queue_full`, `too_many_in_flight`)."""
        own = self.limits(owner)
        if not own.rate_per_s:
            return
        wait = await self.store.take_token(owner, own.rate_per_s, own.burst)
        if wait > 0:
            raise Problem(
                429,
                "rate-limited",
                f"over {own.rate_per_s:g} submissions/s for {own.who} (burst {own.burst})",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def queue_full(self, spec: ModelSpec, lane: Lane) -> Problem:
        """The answer when MAX_QUEUE_DEPTH messages wait on the lane's queue (the job store checks it
        as it creates the job; with several small jobs to a message it counts messages)."""
        cap, queue = self.settings.max_queue_depth, keys.lane_queue(spec, lane)
        return Problem(
            503, "queue-full", f"queue {queue} holds {cap} jobs or more; retry later", headers={"Retry-After": "5"}
        )

    def too_many_in_flight(self, owner: str, n: str) -> Problem:
        own = self.limits(owner)
        return Problem(
            429,
            "too-many-in-flight",
            f"{n} jobs not yet finished for {own.who} ({own.in_flight_setting} {own.max_in_flight}); "
            "wait for some to finish",
            headers={"Retry-After": "5"},
        )
