"""The model a worker serves: loaded once, warmed up, called one batch at a time by the batcher."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

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


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """DTYPE: `auto` is bfloat16 on CUDA and float32 on a CPU (shared/settings.py says why)."""
    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, requested)


# glibc's malloc on a CPU pass: by default every freed block of the pass above 128 KiB goes back to
# the kernel and the next pass faults it in again (bolt-tiny, 64 series: 12,000-22,000 page faults
# and 22-38 ms of system CPU a pass, ~15 % of it). Kept in the heap instead: 0-1,000 faults a pass,
# and ~50 MB more resident. An operator's own MALLOC_* or GLIBC_TUNABLES settings win.
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


# torch's intra-op threads by default, read before any runtime sets its building thread's to 1.
DEFAULT_THREADS = torch.get_num_threads()


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for passes that allocate and free the same large buffers every time
    (above); False where it is not glibc or the operator configured malloc."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


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
        self.dtype = pick_dtype(settings.dtype, self.device)
        # On a CPU: the intra-op threads of each async model thread (`pin_threads`; by default the
        # cores shared out among ASYNC_THREADS of them, but for a sample-based family, whose passes
        # take turns on the random generator, `predict`); 0 on a GPU: torch's default.
        split = 1 if self.family.sample_based else settings.async_threads
        shared = max(1, DEFAULT_THREADS // split)
        self.threads = (settings.torch_threads or shared) if self.device == "cpu" else 0
        # The first async thread's, while no other async thread has a pass under way (`use_threads`).
        self.alone_threads = (settings.torch_threads or DEFAULT_THREADS) if self.device == "cpu" else 0
        self._lane = threading.local()  # the calling model thread's count (`pin_threads`)
        if self.threads:
            # This thread runs no pass: an OpenMP team it started (loading runs parallel copies)
            # would outlive the loading and slow the model threads' passes (`pin_threads`).
            torch.set_num_threads(1)
            keep_freed_memory()
        elif settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        started = time.perf_counter()
        # from_pretrained dispatches on the config's pipeline class: Bolt gets ChronosBoltPipeline.
        self.pipeline = BaseChronosPipeline.from_pretrained(weights.path, device_map=self.device, dtype=self.dtype)
        self.load_s = time.perf_counter() - started
        self.max_batch = settings.max_batch or spec.max_batch(self.device)
        self.model_store, self.finetuned_cache = settings.model_store, settings.finetuned_cache
        self._variants: OrderedDict[str, BaseChronosPipeline] = OrderedDict()  # fine-tuned, least recent first
        # The model threads call `predict` at once (workers/batcher.py): a sample-based family's pass
        # (T5, seeded or not) holds torch's one random generator, so a seeded pass draws what it would
        # alone; and the fine-tuned models are loaded and evicted by one thread at a time.
        self._random, self._loading = threading.Lock(), threading.Lock()
        # On a GPU the two passes take turns: `max_batch` is sized by a warm-up of one pass alone, and
        # their kernels would share the default stream anyway. On a CPU they overlap, each on its
        # own cores (measured: bench/README.md).
        self._device = threading.Lock() if self.device != "cpu" else None
        # Warm up at the largest batch, so the first real batch pays no allocation or kernel selection,
        # on a thread of its own: its OpenMP team ends with it (`pin_threads`).
        warmup = [Decoded.of([float(i % 7) for i in range(64)])] * self.max_batch
        with ThreadPoolExecutor(1, thread_name_prefix="warmup") as warming:
            warming.submit(self._warm_up, warmup).result()
        log.info(
            "loaded %s (%s weights from %s) on %s/%s in %.1fs, max batch %d, %d torch threads",
            spec.id, weights.kind, weights.source, self.device, str(self.dtype).removeprefix("torch."),
            self.load_s, self.max_batch, self.threads or torch.get_num_threads(),
        )  # fmt: skip

    def _warm_up(self, inputs: Sequence[Decoded]) -> None:
        self.pin_threads(sync=False)
        self.predict(inputs, 8, [0.5], sampling=self.family.warmup_sampling)

    def pin_threads(self, sync: bool) -> None:
        """Called by each model thread as it starts (workers/batcher.py): on a CPU, the async lane's
        passes run on `threads` intra-op threads and the sync lane's on one, so that only one
        OpenMP team exists (with ASYNC_THREADS the cores are shared out among the async threads:
        one intra-op thread each on two cores). A second one, even idle, slowed every pass of the
        first: libgomp spins only briefly while it manages more threads than there are cores, and
        sleeps instead
        (measured on 2 cores, bolt-tiny from a model thread: 64 series 100 -> 112-116 ms, one
        series 6.6 -> 9.5-11.7 ms; bench/README.md). A sync pass runs beside an async pass on a
        busy host anyway, where one more thread is what the cores have room for."""
        self._lane.threads = (1 if sync else self.threads) if self.threads else 0

    def use_threads(self, alone: bool) -> None:
        """The first async thread (workers/batcher.py), before each pass: every core while no other
        async thread has a pass under way (`alone`), else its share, as the others run on theirs."""
        if self.threads:
            self._lane.threads = self.alone_threads if alone else self.threads

    def _use_lane_threads(self) -> None:
        """Set the calling lane's count before each pass, not once as the thread starts: a thread's
        first parallel operation (or `get_num_threads`) makes ATen copy into it the count any
        thread last set, so the async lane's 2 set first could become the sync lane's 1 (the
        flood on 2 cores then served 307-314 series/s, against 373-388 checked before each pass).
        The check reads the thread's own count, so after its first pass it sets nothing."""
        threads = getattr(self._lane, "threads", self.threads)
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

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
        self._use_lane_threads()
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
