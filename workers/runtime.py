"""The model a worker serves: loaded once, warmed up, called in model-sized batches."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from chronos import BaseChronosPipeline

from shared.catalog import ModelSpec
from shared.settings import Settings
from workers import metrics
from workers.weights import Weights

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job was cancelled while it ran; raised between batches."""


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


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
        self.max_batch = spec.max_batch(self.device)
        warmup = {"num_samples": 2} if spec.sample_based else None
        self.forecast([[float(i % 7) for i in range(64)]], prediction_length=8, quantile_levels=[0.5], sampling=warmup)
        log.info(
            "loaded %s (%s weights from %s) on %s/%s in %.1fs, max batch %d, %d torch threads",
            spec.id, weights.kind, weights.source, self.device, str(self.dtype).removeprefix("torch."),
            self.load_s, self.max_batch, torch.get_num_threads(),
        )  # fmt: skip

    def forecast(
        self,
        targets: Sequence[Sequence[float | None]],
        prediction_length: int,
        quantile_levels: Sequence[float],
        sampling: Mapping[str, float | int] | None = None,
        return_samples: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[dict[str, list]]:
        """Forecast every series: one dict per series with 'mean', one key per quantile level, and
        'samples' (sample paths, T5 only) when asked for.

        `sampling` holds num_samples/temperature/top_k/top_p for sample-based models.
        """
        out: list[dict[str, list]] = []
        for start in range(0, len(targets), self.max_batch):
            # The first batch follows the claim on the job directly; later ones honour a cancel request.
            if start and should_stop is not None and should_stop():
                raise Cancelled()
            batch = [self._tensor(t) for t in targets[start : start + self.max_batch]]
            metrics.BATCH.labels(self.spec.id).observe(len(batch))
            with torch.inference_mode():
                if self.spec.sample_based:
                    quantiles, mean, samples = self._from_samples(batch, prediction_length, quantile_levels, sampling)
                else:
                    quantiles, mean = self.pipeline.predict_quantiles(
                        batch, prediction_length=prediction_length, quantile_levels=list(quantile_levels)
                    )
            quantiles = quantiles.to(torch.float32).numpy()
            mean = mean.to(torch.float32).numpy()
            for i in range(len(batch)):
                series = {"mean": mean[i].tolist()}
                for j, level in enumerate(quantile_levels):
                    series[str(level)] = quantiles[i, :, j].tolist()
                if return_samples:
                    series["samples"] = samples[i].tolist()
                out.append(series)
        return out

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
