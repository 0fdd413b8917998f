"""The model a worker serves: loaded once, warmed up, called one batch at a time by the batcher."""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from chronos import BaseChronosPipeline

from shared import model_store
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


# On a CPU, a pass of fewer series than this runs on one intra-op thread (unless TORCH_THREADS is
# set). Measured on two cores, bolt-tiny, from the worker's model thread: one series 7.2 ms on one
# thread against 8.8 on two, four series 14.7 against 21.9, eight 24.9 against 23.0, 64 190 against
# 122. Small passes are mostly /v1/predict calls, whose latency the split costs; a busy host's other
# processes also stall a team of threads more than a single one.
SMALL_PASS = 8


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
        # The intra-op threads of a large pass; small ones use one (SMALL_PASS). 0: always the same.
        self.threads = torch.get_num_threads() if self.device == "cpu" and not settings.torch_threads else 0
        started = time.perf_counter()
        # from_pretrained dispatches on the config's pipeline class: Bolt gets ChronosBoltPipeline.
        self.pipeline = BaseChronosPipeline.from_pretrained(weights.path, device_map=self.device, dtype=self.dtype)
        self.load_s = time.perf_counter() - started
        self.max_batch = settings.max_batch or spec.max_batch(self.device)
        self.model_store, self.finetuned_cache = settings.model_store, settings.finetuned_cache
        self._variants: OrderedDict[str, BaseChronosPipeline] = OrderedDict()  # fine-tuned, least recent first
        # Two model threads call `predict` at once (workers/batcher.py): a sample-based family's pass
        # (T5, seeded or not) holds torch's one random generator, so a seeded pass draws what it would
        # alone; and the fine-tuned models are loaded and evicted by one thread at a time.
        self._random, self._loading = threading.Lock(), threading.Lock()
        # On a GPU the two passes take turns: `max_batch` is sized by a warm-up of one pass alone, and
        # their kernels would share the default stream anyway. On a CPU they overlap, each on its
        # own cores (measured: bench/README.md).
        self._device = threading.Lock() if self.device != "cpu" else None
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
        variant: str | None = None,
    ) -> list[np.ndarray]:
        """One forward pass over `inputs`: per series a float32 array [variates, rows, horizon], rows
        being the mean, one per quantile level, then the sample paths (T5, when `return_samples`).
        `sampling` holds num_samples/temperature/top_k/top_p (T5), `seed` seeds T5's sampling;
        `cross_learning` forecasts the inputs as one group (Chronos-2); `variant` names the
        fine-tuned model of this base model to run instead of the base model."""
        pipeline = self.pipeline if variant is None else self.finetuned(variant)
        threads = 1 if self.threads > 1 and len(inputs) < SMALL_PASS else self.threads
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # the calling thread's own count (OpenMP's, MKL's)
        turn = self._device or (self._random if self.family.sample_based else contextlib.nullcontext())
        with turn, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            return self.family.predict(
                pipeline, inputs, prediction_length, quantile_levels, sampling, return_samples, cross_learning
            )

    def finetuned(self, name: str) -> BaseChronosPipeline:
        """A fine-tuned model of this base model, loaded from the model store on first use and kept
        among the FINETUNED_CACHE most recently used. A LoRA adapter is merged into a copy of the
        base weights, so every loaded model is a plain pipeline (a full copy of the weights)."""
        with self._loading:
            return self._finetuned(name)

    def _finetuned(self, name: str) -> BaseChronosPipeline:
        if name in self._variants:
            self._variants.move_to_end(name)
            return self._variants[name]
        manifest = model_store.manifest(self.model_store, name)
        if manifest is None:
            raise RuntimeError(f"fine-tuned model {name} is not in the model store ({self.model_store})")
        if manifest.get("base_revision") != self.weights.revision:
            raise RuntimeError(
                f"{name} was tuned from {self.spec.id} revision {manifest.get('base_revision')}; "
                f"this worker serves revision {self.weights.revision}"
            )
        weights = model_store.path(self.model_store, name) / model_store.WEIGHTS
        started = time.perf_counter()
        if manifest["mode"] == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(copy.deepcopy(self.pipeline.inner_model), weights).merge_and_unload()
            pipeline = type(self.pipeline)(model=model)
        else:
            pipeline = BaseChronosPipeline.from_pretrained(weights, device_map=self.device, dtype=self.dtype)
        pipeline.inner_model.eval()
        self._variants[name] = pipeline
        while len(self._variants) > self.finetuned_cache:
            evicted, _ = self._variants.popitem(last=False)
            log.info("fine-tuned model %s unloaded (FINETUNED_CACHE=%d)", evicted, self.finetuned_cache)
        log.info("fine-tuned model %s (%s) loaded in %.1fs", name, manifest["mode"], time.perf_counter() - started)
        return pipeline

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
