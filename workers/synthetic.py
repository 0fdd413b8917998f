"""Synthetic checkpoints: the exact published architecture of a catalog model with seeded random weights.

No machine here reaches the model hub, so this writes what `from_pretrained` would find
in a real snapshot (config.json with its `chronos_config`, safetensors weights) and a
marker file that makes every consumer label the weights synthetic. Compute cost equals
the real model's; the forecasts are meaningless. The layout is each family's
(`hf_config`, `checkpoint_classes` in workers/families.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from shared.catalog import ModelSpec

MARKER = "chronos_queue_synthetic.json"


def build(spec: ModelSpec, out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a synthetic checkpoint of `spec` to `out` (atomically; an existing one is kept)."""
    # Here, not at the top: resolving a real checkpoint (workers/weights.py) needs no torch.
    import torch

    from workers import families

    out = Path(out)
    if (out / MARKER).exists():
        return out
    family = families.of(spec)
    config_class, model_class = family.checkpoint_classes()
    config = config_class(**family.hf_config())
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
