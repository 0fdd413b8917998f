"""Which model serves a request: fallback chains, A/B splits and the circuit breaker, applied
before a job is created (api/service.py). Ensembles, virtual models whose members each run a
job, are in api/ensembles.py.

The configuration (FALLBACKS, AB_SPLITS, ENSEMBLES) is parsed once, when the app starts: a
name the catalog does not know stops the start. What a request then costs: the availability of
each model tried is the heartbeats-and-circuit read the fleet caches for a second (api/fleet.py),
so routing adds no round trip unless a circuit is open (then one, for a probe place).

- **Fallbacks**: a sync call (or an async job with `parameters.allow_fallback`) whose model has
  no live worker or an open circuit is served by the next model of its chain that has both.
  With none, the answer is the requested model's own refusal.
- **A/B splits**: a share of a model's requests goes to a candidate model, picked by a hash of
  the request's first `item_id` (or, without one, of its first series' values), so a series
  always meets the same model. A multi-series request goes whole to the arm of its first series.
  A candidate that cannot serve a sync call (no worker, open circuit) leaves the call to the
  requested model and its chain.
- **Pinned revisions**: `parameters.weights_revision` counts only the workers that serve it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from shared import catalog
from shared.catalog import ModelSpec
from shared.series import SeriesSet
from shared.settings import Settings
from shared.store import AsyncJobStore, Lane

from api import breaker, limits
from api.bodies import ForecastJob
from api.fleet import Fleet, no_worker
from api.metrics import ApiMetrics
from api.problems import Problem

COMBINERS = ("median", "mean")


@dataclass(frozen=True)
class Ensemble:
    """A virtual model: each member forecasts, and their quantiles are combined level by level."""

    name: str
    combine: str  # one of COMBINERS
    members: tuple[ModelSpec, ...]


@dataclass(frozen=True)
class Routes:
    """The routing configuration, parsed (`from_settings`)."""

    # model id -> the models after it in its chain, in order
    fallbacks: dict[str, tuple[ModelSpec, ...]] = field(default_factory=dict)
    # model id -> its arms: (model, share of requests in [0, 1]), the requested model first
    splits: dict[str, tuple[tuple[ModelSpec, float], ...]] = field(default_factory=dict)
    ensembles: dict[str, Ensemble] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Routes:
        return cls(
            parse_fallbacks(settings.fallbacks), parse_splits(settings.ab_splits), parse_ensembles(settings.ensembles)
        )


def _model(name: str, setting: str) -> ModelSpec:
    spec = catalog.find(name.strip())
    if spec is None:
        raise ValueError(f"{setting}: unknown model {name.strip()!r}")
    return spec


def parse_fallbacks(text: str | None) -> dict[str, tuple[ModelSpec, ...]]:
    """`a>b>c;d>e` (or `a>b>c,d>e`): each model falls back to the ones after it in its chain."""
    chains: dict[str, tuple[ModelSpec, ...]] = {}
    for chain in filter(None, (c.strip() for c in re.split("[;,]", text or ""))):
        specs = [_model(name, "FALLBACKS") for name in chain.split(">")]
        for i, spec in enumerate(specs):
            if spec.id in chains:
                raise ValueError(f"FALLBACKS: {spec.id} is in two chains")
            chains[spec.id] = tuple(specs[i + 1 :])
    return chains


def parse_splits(text: str | None) -> dict[str, tuple[tuple[ModelSpec, float], ...]]:
    """`requested=90,candidate=10;…`: shares (any positive weights, normalised), the requested model first."""
    splits = {}
    for split in filter(None, (s.strip() for s in (text or "").split(";"))):
        arms = []
        for arm in split.split(","):
            name, _, share = arm.partition("=")
            try:
                weight = float(share)
            except ValueError:
                raise ValueError(f"AB_SPLITS: {arm.strip()!r} is not model=share") from None
            if weight < 0:
                raise ValueError(f"AB_SPLITS: negative share in {arm.strip()!r}")
            arms.append((_model(name, "AB_SPLITS"), weight))
        total = sum(weight for _, weight in arms)
        if len(arms) < 2 or total <= 0:
            raise ValueError(f"AB_SPLITS: {split!r} needs the requested model and a candidate, with shares")
        splits[arms[0][0].id] = tuple((spec, weight / total) for spec, weight in arms)
    return splits


def parse_ensembles(text: str | None) -> dict[str, Ensemble]:
    """`name=median(a,b);other=mean(a,b,c)`."""
    ensembles = {}
    for entry in filter(None, (e.strip() for e in (text or "").split(";"))):
        match = re.fullmatch(r"([\w.\-/]+)\s*=\s*(\w+)\((.*)\)", entry)
        if match is None or match[2] not in COMBINERS:
            raise ValueError(f"ENSEMBLES: {entry!r} is not name=median(a,b,…) or name=mean(a,b,…)")
        name = match[1]
        if catalog.find(name) is not None:
            raise ValueError(f"ENSEMBLES: {name} is a catalog model's name")
        members = tuple(_model(m, "ENSEMBLES") for m in match[3].split(","))
        if len(members) < 2 or len(set(members)) != len(members):
            raise ValueError(f"ENSEMBLES: {name} needs two or more distinct members")
        ensembles[name] = Ensemble(name, match[2], members)
    return ensembles


def split_point(series: SeriesSet) -> float:
    """Where a request falls in [0, 1) for A/B splits: a hash of its first item_id, or without one of
    its first series' values, so the same series always falls at the same point."""
    key = series.item_ids[0].encode() if series.item_ids and series.item_ids[0] else series.rows(0).tobytes()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def arm(arms: tuple[tuple[ModelSpec, float], ...], point: float) -> ModelSpec:
    """The arm whose share holds `point` (the shares laid end to end over [0, 1))."""
    upto = 0.0
    for spec, share in arms:
        upto += share
        if point < upto:
            return spec
    return arms[-1][0]


class Router:
    def __init__(self, settings: Settings, fleet: Fleet, store: AsyncJobStore, metrics: ApiMetrics, routes: Routes):
        self.settings, self.fleet, self.store, self.metrics, self.routes = settings, fleet, store, metrics, routes

    def ensemble(self, name: str) -> Ensemble | None:
        return self.routes.ensembles.get(name)

    async def choose(self, job: ForecastJob, lane: Lane, waited: bool) -> ModelSpec:
        """The model to run the job on (its limits checked), or the problem that refuses it: 409 when
        the requested model is not served synchronously, else 503 `no-worker` / `model-unavailable`.

        A job someone waits on (every sync call) needs a live worker and a circuit that lets it
        through, and goes down its model's fallback chain until one has both; an async job does
        only with `allow_fallback` (and is queued on its model when none has), else it is queued
        on its model (or A/B arm) until a worker takes it.
        """
        requested = self.fleet.model(job.model)
        limits.check(job.series, job.parameters, requested, self.settings, job.field)
        if lane is Lane.SYNC:
            self.fleet.check_sync(requested)
        candidates = [requested]
        arms = self.routes.splits.get(requested.id)
        if arms:
            picked = arm(arms, split_point(job.series))
            self.metrics.ab_requests.labels(requested.id, picked.id).inc()
            if picked is not requested:
                candidates.insert(0, picked)
        live_needed = waited or lane is Lane.SYNC
        routed = live_needed or job.parameters.allow_fallback
        if routed:
            candidates += [spec for spec in self.routes.fallbacks.get(requested.id, ()) if spec not in candidates]
        elif not job.parameters.weights_revision:
            return candidates[0]
        refusal: Problem | None = None
        for spec in candidates if routed else candidates[:1]:
            try:
                await self._serves(spec, requested, job, lane, routed)
            except Problem as problem:
                if refusal is None or spec is requested:  # the requested model's own refusal, if it had one
                    refusal = problem
                continue
            return spec
        if not live_needed and not job.parameters.weights_revision:  # allow_fallback, and none serves now
            return candidates[0]
        assert refusal is not None
        raise refusal

    async def pinned(self, spec: ModelSpec, revision: str | None) -> None:
        """503 `no-worker` unless a live worker serves `revision` (when one is pinned)."""
        if revision and not any(info.get("revision") == revision for info in await self.fleet.live_workers(spec)):
            raise no_worker(spec, revision)

    async def _serves(self, spec: ModelSpec, requested: ModelSpec, job: ForecastJob, lane: Lane, routed: bool) -> None:
        """Return when `spec` can take the job now, else raise why not. A `routed` job needs a live
        worker and a circuit that lets it through; a pinned one, a live worker at its revision."""
        if spec is not requested:
            if lane is Lane.SYNC:
                self.fleet.check_sync(spec)
            limits.check(job.series, job.parameters, spec, self.settings, job.field)
        live, circuit = await self.fleet.health(spec)
        pinned = job.parameters.weights_revision
        if not any(not pinned or info.get("revision") == pinned for info in live):
            raise no_worker(spec, pinned)
        if routed and not await breaker.passes(self.store, spec, circuit):
            raise breaker.unavailable(spec, circuit, self.settings)
