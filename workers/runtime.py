"""The model a worker serves: loaded once, warmed up, called one batch at a time by the batcher."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from chronos import BaseChronosPipeline

from shared.catalog import ModelSpec
from shared.schemas import ForecastParameters
from shared.series import Decoded
from shared.settings import Settings

from workers import families
from workers.weights import Weights

log = logging.getLogger(__name__)


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _out_of_memory(exc: Exception) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class ModelRuntime:
    """One loaded Chronos pipeline (every family alike, through `BaseChronosPipeline`), run by its
    family's adapter (workers/families.py)."""

    def __init__(self, spec: ModelSpec, weights: Weights, settings: Settings):
        self.spec = spec
        self.family = families.of(spec)
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
        warmup = [Decoded.of([float(i % 7) for i in range(64)])] * self.max_batch
        self.predict(warmup, 8, [0.5], sampling=self.family.warmup_sampling)
        log.info(
            "loaded %s (%s weights from %s) on %s/%s in %.1fs, max batch %d, %d torch threads",
            spec.id, weights.kind, weights.source, self.device, str(self.dtype).removeprefix("torch."),
            self.load_s, self.max_batch, torch.get_num_threads(),
        )  # fmt: skip

    def batch_limit(self, params: ForecastParameters) -> int:
        """Series per forward pass for these parameters (the family's limit at the current `max_batch`)."""
        return self.family.batch_limit(self.max_batch, params)

    def predict(
        self,
        inputs: Sequence[Decoded],
        prediction_length: int,
        quantile_levels: Sequence[float],
        sampling: Mapping[str, float | int] | None = None,
        return_samples: bool = False,
        seed: int | None = None,
        cross_learning: bool = False,
    ) -> list[np.ndarray]:
        """One forward pass over `inputs`: per series a float32 array [variates, rows, horizon], rows
        being the mean, one per quantile level, then the sample paths (T5, when `return_samples`).
        `sampling` holds num_samples/temperature/top_k/top_p (T5), `seed` seeds T5's sampling;
        `cross_learning` forecasts the inputs as one group (Chronos-2)."""
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            return self.family.predict(
                self.pipeline, inputs, prediction_length, quantile_levels, sampling, return_samples, cross_learning
            )

    def predict_isolating(self, inputs: Sequence, *args, **kwargs) -> list[np.ndarray | Exception]:
        """`predict`, but a failure is narrowed down by halving the batch: the series that fail on
        their own get their exception, every other series its forecast. Out of memory also lowers
        `max_batch` for the batches to come, so no job fails because its batch was too big. A
        cross-learning pass is one group: halved, every forecast would change, so it fails whole."""
        try:
            return [*self.predict(inputs, *args, **kwargs)]
        except Exception as exc:
            if kwargs.get("cross_learning"):
                log.error("a cross-learning group of %d series failed: %s: %s", len(inputs), type(exc).__name__, exc)
                return [exc] * len(inputs)
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
