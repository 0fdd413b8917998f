"""The model catalog: every Chronos variant the service knows, as data.

Both the API (validation, routing, /v1/models) and the workers (architecture of
synthetic checkpoints, batch limits) read this one table; nothing else in the
code branches on a model's name. What a model's family can do and how it runs
lives in its adapter (shared/families.py, workers/families.py), found by `family`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Family(StrEnum):
    T5 = "t5"
    BOLT = "bolt"
    CHRONOS2 = "chronos2"


BOLT_QUANTILES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CHRONOS2_QUANTILES: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
    0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99,
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry: published architecture facts plus serving defaults."""

    id: str
    family: Family
    d_model: int
    d_ff: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    params_m: int
    context_length: int
    prediction_length: int
    # Serving defaults (overridable by settings).
    sync_eligible: bool
    max_batch_cpu: int
    max_batch_cuda: int
    # Quantile levels the model outputs directly (None for sample-based models).
    native_quantiles: tuple[float, ...] | None = None

    @property
    def slug(self) -> str:
        """Text after the last '/': also the name of the model's queue."""
        return self.id.rsplit("/", 1)[-1]

    def max_batch(self, device: str) -> int:
        """Series per forward pass; T5 memory grows with batch x samples, so its limits are lower."""
        return self.max_batch_cuda if device.startswith("cuda") else self.max_batch_cpu


def _t5(size: str, d_model: int, d_ff: int, layers: int, heads: int, params_m: int, **kw) -> ModelSpec:
    return ModelSpec(
        id=f"amazon/chronos-t5-{size}", family=Family.T5, d_model=d_model, d_ff=d_ff,
        encoder_layers=layers, decoder_layers=layers, heads=heads, params_m=params_m,
        context_length=512, prediction_length=64, **kw,
    )  # fmt: skip


def _bolt(size: str, d_model: int, d_ff: int, layers: int, heads: int, params_m: int, **kw) -> ModelSpec:
    return ModelSpec(
        id=f"amazon/chronos-bolt-{size}", family=Family.BOLT, d_model=d_model, d_ff=d_ff,
        encoder_layers=layers, decoder_layers=layers, heads=heads, params_m=params_m,
        context_length=2048, prediction_length=64, sync_eligible=True, native_quantiles=BOLT_QUANTILES, **kw,
    )  # fmt: skip


# max_batch_* count series; for T5 one series costs num_samples decoder rows (20 by default).
CATALOG: tuple[ModelSpec, ...] = (
    _t5("tiny", 256, 1024, 4, 4, 8, sync_eligible=True, max_batch_cpu=16, max_batch_cuda=256),
    _t5("mini", 384, 1536, 4, 8, 20, sync_eligible=False, max_batch_cpu=16, max_batch_cuda=256),
    _t5("small", 512, 2048, 6, 8, 46, sync_eligible=False, max_batch_cpu=8, max_batch_cuda=256),
    _t5("base", 768, 3072, 12, 12, 200, sync_eligible=False, max_batch_cpu=8, max_batch_cuda=128),
    _t5("large", 1024, 4096, 24, 16, 710, sync_eligible=False, max_batch_cpu=4, max_batch_cuda=32),
    _bolt("tiny", 256, 1024, 4, 4, 9, max_batch_cpu=64, max_batch_cuda=1024),
    _bolt("mini", 384, 1536, 4, 8, 21, max_batch_cpu=64, max_batch_cuda=1024),
    _bolt("small", 512, 2048, 6, 8, 48, max_batch_cpu=64, max_batch_cuda=1024),
    _bolt("base", 768, 3072, 12, 12, 205, max_batch_cpu=32, max_batch_cuda=1024),
    ModelSpec(
        id="amazon/chronos-2",
        family=Family.CHRONOS2,
        d_model=768,
        d_ff=3072,
        encoder_layers=12,
        decoder_layers=0,
        heads=12,
        params_m=120,
        context_length=8192,
        prediction_length=1024,
        sync_eligible=False,
        max_batch_cpu=32,
        max_batch_cuda=256,
        native_quantiles=CHRONOS2_QUANTILES,
    ),
)

_BY_NAME: dict[str, ModelSpec] = {key: m for m in CATALOG for key in (m.id, m.slug)}


def find(name: str) -> ModelSpec | None:
    """Look a model up by full id (`amazon/chronos-bolt-tiny`) or slug (`chronos-bolt-tiny`)."""
    return _BY_NAME.get(name)


def get(name: str) -> ModelSpec:
    """Like `find`, but an unknown name is a `KeyError` naming the known ids."""
    spec = find(name)
    if spec is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(m.id for m in CATALOG)}")
    return spec
