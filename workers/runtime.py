"""The model a worker serves: loaded once, warmed up, called one batch at a time by the batcher."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from chronos import BaseChronosPipeline

from shared.catalog import Family, ModelSpec
from shared.schemas import ForecastParameters
from shared.settings import Settings
from workers.weights import Weights

log = logging.getLogger(__name__)

# The sample count T5's batch limits are set for: memory grows with batch x samples.
_REFERENCE_SAMPLES = 20


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _missing_as_nan(values: Sequence, categorical: bool = False) -> np.ndarray:
    if categorical:
        return np.array(list(values), dtype=object)  # None marks a missing category
    return np.array([math.nan if x is None else x for x in values], dtype=np.float32)


def _categorical(series: Mapping) -> set[str]:
    """Covariates holding strings in their past or future values (all-missing past values take the
    future's kind, so a covariate is one kind across both)."""
    return {
        name
        for group in ("past_covariates", "future_covariates")
        for name, values in (series.get(group) or {}).items()
        if any(isinstance(x, str) for x in values)
    }


def _chronos2_input(series: Mapping) -> dict:
    """A request's series as `Chronos2Pipeline` takes it: arrays, NaN (numeric) or None (categorical) for missing."""
    target = series["target"]
    variates = target if isinstance(target[0], list) else [target]
    out: dict = {"target": np.stack([_missing_as_nan(v) for v in variates])}
    categorical = _categorical(series)
    for group in ("past_covariates", "future_covariates"):
        if series.get(group):
            out[group] = {name: _missing_as_nan(values, name in categorical) for name, values in series[group].items()}
    return out


def _schema(series: Mapping) -> tuple:
    """What series must share to go through one Chronos-2 call: variates, covariate names and kinds."""
    target = series["target"]
    categorical = _categorical(series)

    def names(group: str) -> tuple:
        return tuple(sorted((name, name in categorical) for name in series.get(group) or {}))

    return (len(target) if isinstance(target[0], list) else 0, names("past_covariates"), names("future_covariates"))


def _out_of_memory(exc: Exception) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class ModelRuntime:
    """One loaded Chronos pipeline (T5 and Bolt alike, through `BaseChronosPipeline`)."""

    def __init__(self, spec: ModelSpec, weights: Weights, settings: Settings):
        self.spec = spec
        self.weights = weights
        self.device = pick_device(settings.device)
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        started = time.perf_counter()
        # from_pretrained dispatches on the config's pipeline class: Bolt gets ChronosBoltPipeline.
        self.pipeline = BaseChronosPipeline.from_pretrained(weights.path, device_map=self.device, dtype=self.dtype)
        self.load_s = time.perf_counter() - started
        self.max_batch = settings.max_batch or spec.max_batch(self.device)
        # Warm up at the largest batch, so the first real batch pays no allocation or kernel selection.
        warmup = {"num_samples": 2} if spec.sample_based else None
        self.predict([{"target": [float(i % 7) for i in range(64)]}] * self.max_batch, 8, [0.5], sampling=warmup)
        log.info(
            "loaded %s (%s weights from %s) on %s/%s in %.1fs, max batch %d, %d torch threads",
            spec.id, weights.kind, weights.source, self.device, str(self.dtype).removeprefix("torch."),
            self.load_s, self.max_batch, torch.get_num_threads(),
        )  # fmt: skip

    def batch_limit(self, params: ForecastParameters) -> int:
        """Series per forward pass for these parameters: T5 scales down as samples per series go up."""
        if self.spec.sample_based and params.num_samples:
            return max(1, self.max_batch * _REFERENCE_SAMPLES // max(params.num_samples, _REFERENCE_SAMPLES))
        return self.max_batch

    def predict(
        self,
        inputs: Sequence[Mapping],
        prediction_length: int,
        quantile_levels: Sequence[float],
        sampling: Mapping[str, float | int] | None = None,
        return_samples: bool = False,
        seed: int | None = None,
    ) -> list[dict[str, list]]:
        """One forward pass over `inputs` (series as in a request: `target`, and for Chronos-2 maybe
        `past_covariates`/`future_covariates`): per series 'mean', one key per quantile level, and
        'samples' (T5 only) when asked. `sampling` holds num_samples/temperature/top_k/top_p (T5),
        `seed` seeds T5's sampling. A several-variate target gets one list per variate under each key."""
        samples = None
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            if self.spec.family is Family.CHRONOS2:
                quantiles, mean = self._chronos2(inputs, prediction_length, quantile_levels)
            else:
                batch = [self._tensor(series["target"]) for series in inputs]
                if self.spec.sample_based:
                    q, m, samples = self._from_samples(batch, prediction_length, quantile_levels, sampling)
                else:
                    q, m = self.pipeline.predict_quantiles(
                        batch, prediction_length=prediction_length, quantile_levels=list(quantile_levels)
                    )
                quantiles, mean = q.to(torch.float32).numpy(), m.to(torch.float32).numpy()
        out = []
        for i in range(len(inputs)):
            series = {"mean": mean[i].tolist()}
            for j, level in enumerate(quantile_levels):
                series[str(level)] = quantiles[i][..., j].tolist()
            if return_samples and samples is not None:
                series["samples"] = samples[i].tolist()
            out.append(series)
        return out

    def _chronos2(self, inputs: Sequence[Mapping], prediction_length: int, quantile_levels: Sequence[float]):
        """Chronos-2 takes one input schema per call (variates, covariate names and kinds), so series
        are grouped by schema: one call per group. Each series' target variates and covariates form
        their own group inside the model (no cross-learning), so jobs sharing a pass never mix."""
        by_schema: dict[tuple, list[int]] = {}
        for i, series in enumerate(inputs):
            by_schema.setdefault(_schema(series), []).append(i)
        quantiles: list = [None] * len(inputs)
        mean: list = [None] * len(inputs)
        for indices in by_schema.values():
            batch = [_chronos2_input(inputs[i]) for i in indices]
            rows = sum(len(b["target"]) + len(b.get("past_covariates", ())) for b in batch)
            q, m = self.pipeline.predict_quantiles(
                batch, prediction_length=prediction_length, quantile_levels=list(quantile_levels), batch_size=rows
            )
            for i, qi, mi in zip(indices, q, m, strict=True):
                univariate = not isinstance(inputs[i]["target"][0], list)
                qi, mi = qi.to(torch.float32).numpy(), mi.to(torch.float32).numpy()  # [variates, H, Q], [variates, H]
                quantiles[i], mean[i] = (qi[0], mi[0]) if univariate else (qi, mi)
        return quantiles, mean

    def predict_isolating(self, inputs: Sequence, *args, **kwargs) -> list[dict | Exception]:
        """`predict`, but a failure is narrowed down by halving the batch: the series that fail on
        their own get their exception, every other series its forecast. Out of memory also lowers
        `max_batch` for the batches to come, so no job fails because its batch was too big."""
        try:
            return self.predict(inputs, *args, **kwargs)
        except Exception as exc:
            if _out_of_memory(exc):
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                if len(inputs) > 1 and self.max_batch > len(inputs) // 2:
                    self.max_batch = max(1, len(inputs) // 2)
                    log.warning("out of memory at batch %d: max batch lowered to %d", len(inputs), self.max_batch)
            if len(inputs) == 1:
                log.error("a series failed on its own: %s: %s", type(exc).__name__, exc)
                return [exc]
            half = len(inputs) // 2
            return self.predict_isolating(inputs[:half], *args, **kwargs) + self.predict_isolating(
                inputs[half:], *args, **kwargs
            )

    def _from_samples(self, batch, prediction_length, quantile_levels, sampling):
        """T5: draw sample paths, then quantiles and mean over them, as `ChronosPipeline.predict_quantiles` does."""
        samples = self.pipeline.predict(batch, prediction_length=prediction_length, **(sampling or {}))
        samples = samples.to(torch.float32)  # [batch, samples, horizon]
        per_step = samples.swapaxes(1, 2)
        levels = torch.tensor(list(quantile_levels), dtype=per_step.dtype)
        quantiles = torch.quantile(per_step, q=levels, dim=-1).permute(1, 2, 0)
        return quantiles, per_step.mean(dim=-1), samples.numpy()

    def _tensor(self, target: Sequence[float | None]) -> torch.Tensor:
        # Only the model's context window is used; cut it here so long inputs do not pad a whole batch.
        tail = target[-self.spec.context_length :]
        return torch.tensor([math.nan if x is None else x for x in tail], dtype=torch.float32)
