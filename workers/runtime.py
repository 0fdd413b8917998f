"""The model a worker serves: loaded once, warmed up, called one batch at a time by the batcher."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from chronos import BaseChronosPipeline

from shared.catalog import Family, ModelSpec
from shared.schemas import ForecastParameters
from shared.series import Decoded
from shared.settings import Settings
from workers.weights import Weights

log = logging.getLogger(__name__)

# The sample count T5's batch limits are set for: memory grows with batch x samples.
_REFERENCE_SAMPLES = 20


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _categorical(series: Decoded) -> set[str]:
    """Covariates holding strings in their past or future values (an all-missing side takes the
    other's kind, so a covariate is one kind across both)."""
    return {name for group in (series.past, series.future) for name, v in group.items() if v.dtype == object}


def _chronos2_input(series: Decoded) -> dict:
    """A stored series as `Chronos2Pipeline` takes it: arrays, NaN (numeric) or None (categorical) for missing."""
    out: dict = {"target": series.target}
    categorical = _categorical(series)
    for group, named in (("past_covariates", series.past), ("future_covariates", series.future)):
        if named:
            out[group] = {
                name: (values if values.dtype == object else np.full(len(values), None, dtype=object))
                if name in categorical else values
                for name, values in named.items()
            }  # fmt: skip
    return out


def _schema(series: Decoded) -> tuple:
    """What series must share to go through one Chronos-2 call: variates, covariate names and kinds."""
    categorical = _categorical(series)

    def names(group: dict) -> tuple:
        return tuple(sorted((name, name in categorical) for name in group))

    return (series.target.shape[0], names(series.past), names(series.future))


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
        self.predict([Decoded.of([float(i % 7) for i in range(64)])] * self.max_batch, 8, [0.5], sampling=warmup)
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
        inputs: Sequence[Decoded],
        prediction_length: int,
        quantile_levels: Sequence[float],
        sampling: Mapping[str, float | int] | None = None,
        return_samples: bool = False,
        seed: int | None = None,
    ) -> list[np.ndarray]:
        """One forward pass over `inputs`: per series a float32 array [variates, rows, horizon], rows
        being the mean, one per quantile level, then the sample paths (T5, when `return_samples`).
        `sampling` holds num_samples/temperature/top_k/top_p (T5), `seed` seeds T5's sampling.
        Bolt and T5 get the whole pass as one left-padded 2-D tensor [series, time]."""
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            if self.spec.family is Family.CHRONOS2:
                return self._chronos2(inputs, prediction_length, quantile_levels)
            batch = self._batch(inputs)
            samples = None
            if self.spec.sample_based:
                q, m, samples = self._from_samples(batch, prediction_length, quantile_levels, sampling)
            else:
                q, m = self.pipeline.predict_quantiles(
                    batch, prediction_length=prediction_length, quantile_levels=list(quantile_levels)
                )
            quantiles, mean = q.to(torch.float32).numpy(), m.to(torch.float32).numpy()  # [B, H, Q], [B, H]
        parts = [mean[:, None, :], quantiles.transpose(0, 2, 1)]
        if return_samples and samples is not None:
            parts.append(samples)  # [B, S, H]
        block = np.concatenate(parts, axis=1)  # [B, rows, H]
        return [block[i : i + 1] for i in range(len(inputs))]

    def _batch(self, inputs: Sequence[Decoded]) -> torch.Tensor:
        """One 2-D float32 tensor, each series' last `context_length` points right-aligned, NaN-padded
        on the left (what the pipelines do to a list of tensors, without a tensor per series)."""
        context = self.spec.context_length
        tails = [series.target[0, -context:] for series in inputs]
        width = max(len(t) for t in tails)
        out = np.full((len(tails), width), np.nan, dtype=np.float32)
        for row, tail in zip(out, tails, strict=True):
            row[width - len(tail) :] = tail
        return torch.from_numpy(out)

    def _chronos2(self, inputs: Sequence[Mapping], prediction_length: int, quantile_levels: Sequence[float]):
        """Chronos-2 takes one input schema per call (variates, covariate names and kinds), so series
        are grouped by schema: one call per group. Each series' target variates and covariates form
        their own group inside the model (no cross-learning), so jobs sharing a pass never mix."""
        by_schema: dict[tuple, list[int]] = {}
        for i, series in enumerate(inputs):
            by_schema.setdefault(_schema(series), []).append(i)
        out: list = [None] * len(inputs)
        for indices in by_schema.values():
            batch = [_chronos2_input(inputs[i]) for i in indices]
            rows = sum(len(b["target"]) + len(b.get("past_covariates", ())) for b in batch)
            q, m = self.pipeline.predict_quantiles(
                batch, prediction_length=prediction_length, quantile_levels=list(quantile_levels), batch_size=rows
            )
            for i, qi, mi in zip(indices, q, m, strict=True):
                qi, mi = qi.to(torch.float32).numpy(), mi.to(torch.float32).numpy()  # [variates, H, Q], [variates, H]
                out[i] = np.concatenate([mi[:, None, :], qi.transpose(0, 2, 1)], axis=1)
        return out

    def predict_isolating(self, inputs: Sequence, *args, **kwargs) -> list[np.ndarray | Exception]:
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
