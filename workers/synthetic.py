"""Synthetic checkpoints: the exact published architecture of a catalog model with seeded random weights.

No machine here reaches the model hub, so this writes what `from_pretrained` would find
in a real snapshot (config.json with its `chronos_config`, safetensors weights) and a
marker file that makes every consumer label the weights synthetic. Compute cost equals
the real model's; the forecasts are meaningless.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from shared.catalog import Family, ModelSpec

MARKER = "chronos_queue_synthetic.json"

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


def hf_config(spec: ModelSpec) -> dict:
    """The config.json fields of a catalog model, as published on the hub."""
    arch = {
        "d_model": spec.d_model,
        "d_ff": spec.d_ff,
        "num_layers": spec.encoder_layers,
        "num_decoder_layers": spec.decoder_layers,
        "num_heads": spec.heads,
    }
    if spec.family is Family.T5:
        return {
            **_T5_COMMON,
            **arch,
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
                "context_length": spec.context_length,
                "prediction_length": spec.prediction_length,
                "num_samples": 20,
                "temperature": 1.0,
                "top_k": 50,
                "top_p": 1.0,
            },
        }
    if spec.family is Family.BOLT:
        return {
            **_T5_COMMON,
            **arch,
            "architectures": ["ChronosBoltModelForForecasting"],
            "chronos_pipeline_class": "ChronosBoltPipeline",
            "vocab_size": 2,
            "reg_token_id": 1,
            "chronos_config": {
                "context_length": spec.context_length,
                "prediction_length": spec.prediction_length,
                "input_patch_size": 16,
                "input_patch_stride": 16,
                "quantiles": list(spec.native_quantiles or ()),
                "use_reg_token": True,
            },
        }
    # Chronos-2: an encoder-only T5-style stack read by Chronos2CoreConfig, as published on the hub.
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


def build(spec: ModelSpec, out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a synthetic checkpoint of `spec` to `out` (atomically; an existing one is kept)."""
    import torch

    out = Path(out)
    if (out / MARKER).exists():
        return out
    config_class, model_class = _classes(spec)
    config = config_class(**hf_config(spec))
    torch.manual_seed(seed)
    model = model_class(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"model": spec.id, "seed": seed, "synthetic": True}, indent=2))
        try:
            tmp.rename(out)
        except OSError:
            if not (out / MARKER).exists():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_synthetic(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).exists()


def _classes(spec: ModelSpec) -> tuple[type, type]:
    """The config and model classes `from_pretrained` will read the checkpoint with."""
    if spec.family is Family.CHRONOS2:
        from chronos.chronos2 import Chronos2CoreConfig, Chronos2Model

        return Chronos2CoreConfig, Chronos2Model
    from transformers import T5Config

    if spec.family is Family.T5:
        from transformers import T5ForConditionalGeneration

        return T5Config, T5ForConditionalGeneration
    from chronos.chronos_bolt import ChronosBoltModelForForecasting

    return T5Config, ChronosBoltModelForForecasting
