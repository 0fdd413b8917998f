"""The torch side of each model family: its forward pass and its synthetic checkpoint.

Each class extends the family's adapter in shared/families.py (the rules the API applies too)
and is chosen by the same catalog `Family`, so `of(spec)` gives a worker one object with the
family's rules, its `predict` and its checkpoint layout. `ModelRuntime` (workers/runtime.py)
loads the pipeline and calls `predict` once per forward pass; `synthetic.build` writes a
checkpoint from `hf_config` and `checkpoint_classes`.

Every `predict` returns, per input series, a float32 array [variates, rows, horizon]: rows are
the mean, then one per quantile level in the order asked, then (T5, when `return_samples`) the
sample paths.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from shared import families
from shared.catalog import Family, ModelSpec
from shared.series import Decoded

# The T5 config.json fields every family's published checkpoint shares.
_T5_COMMON = {
    "d_kv": 64,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 0.05,
    "feed_forward_proj": "relu",
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "n_positions": 512,
    "tie_word_embeddings": False,
    "use_cache": True,
}


class TorchFamily(families.ModelFamily, ABC):
    """A family's adapter with its torch side; the pipeline is the one `BaseChronosPipeline.from_pretrained`
    loaded from the model's checkpoint (it dispatches on the checkpoint's config, so loading is the same for all)."""

    # Sampling options of the warm-up pass (None: the model takes none).
    warmup_sampling: ClassVar[Mapping[str, int] | None] = None

    @abstractmethod
    def predict(
        self,
        pipeline,
        inputs: Sequence[Decoded],
        prediction_length: int,
        quantile_levels: Sequence[float],
        sampling: Mapping[str, float | int] | None = None,
        return_samples: bool = False,
        cross_learning: bool = False,
    ) -> list[np.ndarray]:
        """One forward pass over `inputs` (called under `torch.inference_mode`, seeded by the caller):
        per series a float32 array [variates, 1 + len(quantile_levels) (+ samples), prediction_length].
        `sampling` holds num_samples/temperature/top_k/top_p for sample-based families;
        `cross_learning` (families that have it) forecasts all `inputs` as one group."""

    @abstractmethod
    def hf_config(self) -> dict:
        """The config.json fields of the model, as published on the hub."""

    @abstractmethod
    def checkpoint_classes(self) -> tuple[type, type]:
        """The config and model classes `from_pretrained` will read the checkpoint with."""


class _EncoderDecoder(TorchFamily):
    """T5 and Bolt: T5 encoder-decoders over one target variate, a whole pass as one 2-D tensor."""

    def predict(
        self, pipeline, inputs, prediction_length, quantile_levels, sampling=None, return_samples=False,
        cross_learning=False,
    ):  # fmt: skip
        q, m, samples = self._forecast(pipeline, self._batch(inputs), prediction_length, quantile_levels, sampling)
        quantiles, mean = q.to(torch.float32).numpy(), m.to(torch.float32).numpy()  # [B, H, Q], [B, H]
        parts = [mean[:, None, :], quantiles.transpose(0, 2, 1)]
        if return_samples and samples is not None:
            parts.append(samples)  # [B, S, H]
        block = np.concatenate(parts, axis=1)  # [B, rows, H]
        return [block[i : i + 1] for i in range(len(inputs))]

    @abstractmethod
    def _forecast(
        self, pipeline, batch: torch.Tensor, prediction_length: int, quantile_levels: Sequence[float], sampling
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
        """Quantiles [B, H, Q] and mean [B, H] of `batch` [B, T], and the sample paths [B, S, H] if drawn."""

    def _batch(self, inputs: Sequence[Decoded]) -> torch.Tensor:
        """One 2-D float32 tensor [series, time], each series' last `context_length` points right-aligned,
        NaN-padded on the left (what the pipelines do to a list of tensors, without a tensor per series)."""
        context = self.spec.context_length
        tails = [series.target[0, -context:] for series in inputs]
        width = max(len(t) for t in tails)
        out = np.full((len(tails), width), np.nan, dtype=np.float32)
        for row, tail in zip(out, tails, strict=True):
            row[width - len(tail) :] = tail
        return torch.from_numpy(out)

    def _stack(self) -> dict:
        """The config.json fields of the encoder-decoder stack."""
        spec = self.spec
        return {
            **_T5_COMMON,
            "d_model": spec.d_model,
            "d_ff": spec.d_ff,
            "num_layers": spec.encoder_layers,
            "num_decoder_layers": spec.decoder_layers,
            "num_heads": spec.heads,
        }


class T5(_EncoderDecoder, families.T5):
    # Two samples: the warm-up exercises the sampling path without paying for the default 20.
    warmup_sampling: ClassVar[Mapping[str, int] | None] = {"num_samples": 2}

    def _forecast(self, pipeline, batch, prediction_length, quantile_levels, sampling):
        """Draw sample paths, then quantiles and mean over them, as `ChronosPipeline.predict_quantiles` does."""
        samples = pipeline.predict(batch, prediction_length=prediction_length, **(sampling or {}))
        samples = samples.to(torch.float32)  # [batch, samples, horizon]
        per_step = samples.swapaxes(1, 2)
        levels = torch.tensor(list(quantile_levels), dtype=per_step.dtype)
        quantiles = torch.quantile(per_step, q=levels, dim=-1).permute(1, 2, 0)
        return quantiles, per_step.mean(dim=-1), samples.numpy()

    def hf_config(self) -> dict:
        return {
            **self._stack(),
            "architectures": ["T5ForConditionalGeneration"],
            "vocab_size": 4096,
            "chronos_config": {
                "tokenizer_class": "MeanScaleUniformBins",
                "tokenizer_kwargs": {"low_limit": -15.0, "high_limit": 15.0},
                "n_tokens": 4096,
                "n_special_tokens": 2,
                "pad_token_id": 0,
                "eos_token_id": 1,
                "use_eos_token": True,
                "model_type": "seq2seq",
                "context_length": self.spec.context_length,
                "prediction_length": self.spec.prediction_length,
                "num_samples": 20,
                "temperature": 1.0,
                "top_k": 50,
                "top_p": 1.0,
            },
        }

    def checkpoint_classes(self) -> tuple[type, type]:
        from transformers import T5Config, T5ForConditionalGeneration

        return T5Config, T5ForConditionalGeneration


class Bolt(_EncoderDecoder, families.Bolt):
    def _forecast(self, pipeline, batch, prediction_length, quantile_levels, sampling):
        """The model's own quantiles (interpolated between its native levels) and mean; no samples."""
        q, m = pipeline.predict_quantiles(
            batch, prediction_length=prediction_length, quantile_levels=list(quantile_levels)
        )
        return q, m, None

    def hf_config(self) -> dict:
        return {
            **self._stack(),
            "architectures": ["ChronosBoltModelForForecasting"],
            "chronos_pipeline_class": "ChronosBoltPipeline",
            "vocab_size": 2,
            "reg_token_id": 1,
            "chronos_config": {
                "context_length": self.spec.context_length,
                "prediction_length": self.spec.prediction_length,
                "input_patch_size": 16,
                "input_patch_stride": 16,
                "quantiles": list(self.spec.native_quantiles or ()),
                "use_reg_token": True,
            },
        }

    def checkpoint_classes(self) -> tuple[type, type]:
        from chronos.chronos_bolt import ChronosBoltModelForForecasting
        from transformers import T5Config

        return T5Config, ChronosBoltModelForForecasting


class Chronos2(TorchFamily, families.Chronos2):
    def predict(
        self, pipeline, inputs, prediction_length, quantile_levels, sampling=None, return_samples=False,
        cross_learning=False,
    ):  # fmt: skip
        """`Chronos2Pipeline` takes one input schema per call (variates, covariate names and kinds), so
        series are grouped by schema: one call per group. Each series' target variates and covariates
        form their own group inside the model, so jobs sharing a pass never mix; with `cross_learning`
        (a pass holding one job's series alone, shared/families.py) the series of a call form one group."""
        by_schema: dict[tuple, list[int]] = {}
        for i, series in enumerate(inputs):
            by_schema.setdefault(_schema(series), []).append(i)
        out: list = [None] * len(inputs)
        for indices in by_schema.values():
            batch = [_chronos2_input(inputs[i]) for i in indices]
            rows = sum(len(b["target"]) + len(b.get("past_covariates", ())) for b in batch)
            q, m = pipeline.predict_quantiles(
                batch, prediction_length=prediction_length, quantile_levels=list(quantile_levels), batch_size=rows,
                cross_learning=cross_learning,
            )  # fmt: skip
            for i, qi, mi in zip(indices, q, m, strict=True):
                qi, mi = qi.to(torch.float32).numpy(), mi.to(torch.float32).numpy()  # [variates, H, Q], [variates, H]
                out[i] = np.concatenate([mi[:, None, :], qi.transpose(0, 2, 1)], axis=1)
        return out

    def hf_config(self) -> dict:
        """An encoder-only T5-style stack read by `Chronos2CoreConfig`, as published on the hub."""
        spec = self.spec
        return {
            **{k: _T5_COMMON[k] for k in ("d_kv", "dropout_rate", "layer_norm_epsilon", "initializer_factor",
                                          "feed_forward_proj", "pad_token_id")},
            "d_model": spec.d_model, "d_ff": spec.d_ff, "num_layers": spec.encoder_layers, "num_heads": spec.heads,
            "architectures": ["Chronos2Model"],
            "chronos_pipeline_class": "Chronos2Pipeline",
            "vocab_size": 2,
            "reg_token_id": 1,
            "rope_theta": 10000.0,
            "chronos_config": {
                "context_length": spec.context_length,
                "input_patch_size": 16,
                "input_patch_stride": 16,
                "output_patch_size": 16,
                "max_output_patches": spec.prediction_length // 16,
                "quantiles": list(spec.native_quantiles or ()),
                "use_reg_token": True,
                "use_arcsinh": True,
                "time_encoding_scale": spec.context_length,
            },
        }  # fmt: skip

    def checkpoint_classes(self) -> tuple[type, type]:
        from chronos.chronos2 import Chronos2CoreConfig, Chronos2Model

        return Chronos2CoreConfig, Chronos2Model


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


FAMILIES: dict[Family, type[TorchFamily]] = {cls.family: cls for cls in (T5, Bolt, Chronos2)}


def of(spec: ModelSpec) -> TorchFamily:
    """The torch-side adapter of `spec`'s family, bound to `spec`."""
    return FAMILIES[spec.family](spec)
