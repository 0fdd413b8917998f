"""The models and the workers serving them, as the API sees them: catalog lookups, live workers
(from their heartbeats, read at most once a second per model), and the views of GET /v1/models."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

from shared import catalog, families, model_store
from shared.schemas import ModelView, VersionView, WorkerView
from shared.settings import Settings
from shared.store import AsyncJobStore, CircuitState, keys

from api import breaker
from api.problems import Problem

if TYPE_CHECKING:  # api/routing.py reads the fleet, so it is imported only to type ensembles
    from api.routing import Ensemble


# A worker whose model was in passes this share of its last heartbeat period counts as saturated.
SATURATED_BUSY = 0.8


class Fleet:
    def __init__(self, settings: Settings, store: AsyncJobStore, ensembles: Mapping[str, Ensemble] | None = None):
        self.settings, self.store = settings, store
        self.ensembles = ensembles or {}
        # model id -> (live workers, circuit, good until)
        self._health: dict[str, tuple[list[dict], CircuitState, float]] = {}

    def model(self, name: str) -> catalog.ModelSpec:
        spec = catalog.find(name)
        if spec is None:
            raise _unknown(name)
        return spec

    async def resolve(self, name: str, owner: str) -> tuple[catalog.ModelSpec, str | None]:
        """The catalog model a request names, and the fine-tuned model it names instead, if any
        (its base model's workers serve it). Another owner's fine-tuned model is unknown (404)."""
        if not model_store.is_finetuned(name):
            return self.model(name), None
        manifest = await self.finetuned(name, owner)
        return self.model(manifest["base_model"]), manifest["id"]

    async def finetuned(self, name: str, owner: str) -> dict:
        """A fine-tuned model's manifest, if it is `owner`'s (404 otherwise, as for another's job)."""
        found = (await self.store.finetuned(name)).get(name)
        if found is None or found.get("owner") != owner:
            raise _unknown(name)
        return found

    async def owned(self, owner: str) -> list[dict]:
        """The manifests of `owner`'s fine-tuned models, oldest first."""
        mine = [m for m in (await self.store.finetuned()).values() if m.get("owner") == owner]
        return sorted(mine, key=lambda m: m.get("created_at", 0))

    async def finetuned_views(self, manifests: list[dict]) -> list[ModelView]:
        """Fine-tuned models as their base models' views (same workers, queues and limits), renamed."""
        if not manifests:
            return []
        specs = tuple(self.model(name) for name in sorted({m["base_model"] for m in manifests}))
        bases = {view.id: view for view in await self.models(specs)}
        keep = ("id", "base_model", "base_revision", "mode", "created_at", "metrics", "weights")
        return [
            bases[m["base_model"]].model_copy(
                update={"id": m["id"], "slug": m["id"], "base_model": m["base_model"],
                        "finetune": {k: m.get(k) for k in keep}}
            )
            for m in manifests
        ]  # fmt: skip

    async def models(
        self, specs: tuple[catalog.ModelSpec, ...] = catalog.CATALOG, ensembles: bool = False
    ) -> list[ModelView]:
        """Catalog entries with live queue depths and the workers heard from recently (one round trip);
        with `ensembles`, the configured ensembles after them."""
        views = []
        for spec, state in zip(specs, await self.store.models(specs), strict=True):
            workers = [WorkerView(**{k: info[k] for k in WorkerView.model_fields if k in info}) for info in state.live]
            kinds = {w.weights for w in workers}
            views.append(
                ModelView(
                    id=spec.id,
                    slug=spec.slug,
                    family=spec.family.value,
                    queue=keys.queue(spec),
                    sync_queue=keys.sync_queue(spec),
                    context_length=spec.context_length,
                    prediction_length=spec.prediction_length,
                    sample_based=families.of(spec).sample_based,
                    native_quantiles=list(spec.native_quantiles) if spec.native_quantiles else None,
                    sync_eligible=self.settings.sync_eligible(spec),
                    queue_depth=state.depth,
                    sync_queue_depth=state.sync_depth,
                    workers_online=len(workers),
                    weights=kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None),
                    workers=sorted(workers, key=lambda w: w.name),
                    circuit=breaker.state(state.circuit, self.settings.breaker_cooloff_s),
                )
            )
        if ensembles:
            by_id = {view.id: view for view in views}
            views += [
                _ensemble_view(ensemble, [by_id[m.id] for m in ensemble.members])
                for ensemble in self.ensembles.values()
            ]
        return views

    async def versions(self, spec: catalog.ModelSpec) -> list[VersionView]:
        """The weights revisions the model's workers serve or served, oldest first (one round trip)."""
        history, live = await self.store.revisions(spec)
        serving = Counter(info.get("revision") for info in live)
        return [
            VersionView(revision=revision, kind=_kind(revision), active=serving[revision] > 0,
                        workers=serving[revision], first_seen=first, last_seen=last)
            for revision, (first, last) in sorted(history.items(), key=lambda entry: entry[1])
        ]  # fmt: skip

    async def health(self, spec: catalog.ModelSpec) -> tuple[list[dict], CircuitState]:
        """The heartbeats of the model's live workers and its circuit (api/breaker.py), read from Redis
        together at most once a second per model: every accepted job (cache, `X-Workers-Online`) and
        every sync call asks."""
        loop = asyncio.get_running_loop()
        known = self._health.get(spec.id)
        if known is not None and known[2] > loop.time():
            return known[0], known[1]
        live, circuit = await self.store.health(spec)
        self._health[spec.id] = (live, circuit, loop.time() + min(1.0, self.settings.heartbeat_s))
        return live, circuit

    async def live_workers(self, spec: catalog.ModelSpec) -> list[dict]:
        """The heartbeats of the model's live workers (see `health`)."""
        return (await self.health(spec))[0]

    async def saturated(self, spec: catalog.ModelSpec) -> bool:
        """Whether every live worker of the model spent most of its last heartbeat period in model
        passes (`busy` in its heartbeat): new work waits for passes in progress anyway."""
        busy = [info.get("busy", 0.0) for info in await self.live_workers(spec)]
        return bool(busy) and min(busy) >= SATURATED_BUSY

    async def revision(self, spec: catalog.ModelSpec) -> str | None:
        """The weights revision every live worker of `spec` serves (None when none or several)."""
        revisions = {info.get("revision") for info in await self.live_workers(spec)}
        return revisions.pop() if len(revisions) == 1 else None

    async def workers_online(self, name: str) -> int:
        """How many workers of the model are live (an async job is accepted with none: one may start
        later); of an ensemble, its least-served member's."""
        if name in self.ensembles:
            return min([await self.workers_online(member.id) for member in self.ensembles[name].members])
        return len(await self.live_workers(self.model(name)))

    async def serving(self, spec: catalog.ModelSpec, wait_s: float = 0) -> None:
        """Return once a worker serves the model (waiting up to `wait_s`), else 503."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            if await self.live_workers(spec):
                return
            if loop.time() >= deadline:
                raise no_worker(spec)
            await asyncio.sleep(0.5)

    def check_sync(self, spec: catalog.ModelSpec) -> None:
        if not self.settings.sync_eligible(spec):
            raise Problem(
                409,
                "not-sync-eligible",
                f"{spec.id} is not served synchronously; submit it with POST /v1/forecasts and poll",
                field="model",
                async_endpoint="/v1/forecasts",
            )


def _unknown(name: str) -> Problem:
    return Problem(404, "unknown-model", f"unknown model {name!r}; GET /v1/models lists them", field="model")


def no_worker(spec: catalog.ModelSpec, revision: str | None = None) -> Problem:
    """503 `no-worker`: no live worker serves the model (at that weights revision, when pinned)."""
    at = f" at weights revision {revision}" if revision else ""
    return Problem(
        503,
        "no-worker",
        f"no worker is serving {spec.id}{at} right now; POST /v1/forecasts queues the job until one starts",
        headers={"Retry-After": "5"},
    )


def _kind(revision: str) -> str:
    """Where a revision comes from, by the prefix workers/weights.py gives it."""
    for prefix, kind in (("hub-", "hub"), ("synthetic-seed-", "synthetic"), ("sha256-", "digest")):
        if revision.startswith(prefix):
            return kind
    return "unknown"


def _ensemble_view(ensemble: Ensemble, members: list[ModelView]) -> ModelView:
    """An ensemble as a catalog entry: it runs when all its members do, as far as the least of them reaches."""
    circuits = {member.circuit for member in members}
    weights = {member.weights for member in members}
    return ModelView(
        id=ensemble.name, slug=ensemble.name, family="ensemble", queue="", sync_queue="",
        context_length=min(m.context_length for m in members),
        prediction_length=min(m.prediction_length for m in members),
        sample_based=False, native_quantiles=None, sync_eligible=True,
        queue_depth=sum(m.queue_depth for m in members), sync_queue_depth=sum(m.sync_queue_depth for m in members),
        workers_online=min(m.workers_online for m in members),
        weights=weights.pop() if len(weights) == 1 else "mixed", workers=[],
        circuit=next((c for c in (breaker.OPEN, breaker.HALF_OPEN) if c in circuits), breaker.CLOSED),
        members=[m.id for m in members], combine=ensemble.combine,
    )  # fmt: skip
