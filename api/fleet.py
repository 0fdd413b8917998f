"""The models and the workers serving them, as the API sees them: catalog lookups, live workers
(from their heartbeats, read at most once a second per model), and the views of GET /v1/models."""

from __future__ import annotations

import asyncio

from shared import catalog, families, model_store
from shared.schemas import ModelView, WorkerView
from shared.settings import Settings
from shared.store import AsyncJobStore, keys

from api.problems import Problem


class Fleet:
    def __init__(self, settings: Settings, store: AsyncJobStore):
        self.settings, self.store = settings, store
        self._heartbeats: dict[str, tuple[list[dict], float]] = {}  # model id -> (live workers, good until)

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

    async def models(self, specs: tuple[catalog.ModelSpec, ...] = catalog.CATALOG) -> list[ModelView]:
        """Catalog entries with live queue depths and the workers heard from recently (one round trip)."""
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
                )
            )
        return views

    async def live_workers(self, spec: catalog.ModelSpec) -> list[dict]:
        """The heartbeats of the model's live workers, read from Redis at most once a second per model:
        every accepted job (cache, `X-Workers-Online`) and every sync call asks."""
        loop = asyncio.get_running_loop()
        known = self._heartbeats.get(spec.id)
        if known is not None and known[1] > loop.time():
            return known[0]
        live = list((await self.store.live_workers(spec)).values())
        self._heartbeats[spec.id] = (live, loop.time() + min(1.0, self.settings.heartbeat_s))
        return live

    async def revision(self, spec: catalog.ModelSpec) -> str | None:
        """The weights revision every live worker of `spec` serves (None when none or several)."""
        revisions = {info.get("revision") for info in await self.live_workers(spec)}
        return revisions.pop() if len(revisions) == 1 else None

    async def workers_online(self, name: str) -> int:
        """How many workers of the model are live (an async job is accepted with none: one may start later)."""
        return len(await self.live_workers(self.model(name)))

    async def serving(self, spec: catalog.ModelSpec, wait_s: float = 0) -> None:
        """Return once a worker serves the model (waiting up to `wait_s`), else 503."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            if await self.live_workers(spec):
                return
            if loop.time() >= deadline:
                raise Problem(
                    503,
                    "no-worker",
                    f"no worker is serving {spec.id} right now; POST /v1/forecasts queues the job until one starts",
                    headers={"Retry-After": "5"},
                )
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
