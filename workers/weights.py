"""Where a worker's weights come from: an explicit directory, the Hugging Face cache, or a synthetic build."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from shared.catalog import ModelSpec
from shared.settings import Settings

from workers import synthetic


class WeightsNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class Weights:
    path: str
    kind: str  # "real" | "synthetic"
    source: str  # human-readable: where they were found

    @cached_property
    def revision(self) -> str:
        """Which weights exactly, the same on every host that serves them (it keys the result cache):
        the hub commit of a cached snapshot, the seed of a synthetic build, else a digest of the files."""
        path = Path(self.path)
        if synthetic.is_synthetic(path):
            return f"synthetic-seed-{json.loads((path / synthetic.MARKER).read_text())['seed']}"
        if path.parent.name == "snapshots":
            return f"hub-{path.name}"
        digest = hashlib.sha256()
        for file in sorted(f for f in path.iterdir() if f.is_file()):
            digest.update(file.name.encode())
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return f"sha256-{digest.hexdigest()[:16]}"


def resolve(spec: ModelSpec, settings: Settings) -> Weights:
    """Find (or, when told to, build) the checkpoint a worker for `spec` serves. Never downloads."""
    if settings.model_path:
        path = Path(settings.model_path)
        if not (path / "config.json").exists():
            raise WeightsNotFound(f"MODEL_PATH={path} holds no config.json (not a Hugging Face checkpoint)")
        return Weights(str(path), _kind(path), "MODEL_PATH")
    if settings.weights in ("real", "any"):
        cached = _hf_cache(spec)
        if cached:
            return Weights(cached, _kind(cached), "Hugging Face cache")
        if settings.weights == "real":
            raise WeightsNotFound(
                f"no weights for {spec.id}: it is not in the Hugging Face cache (HF_HOME) and MODEL_PATH is unset. "
                f"Either put the model in the cache / set MODEL_PATH to a checkpoint directory, or serve "
                f"meaningless synthetic weights with WEIGHTS=synthetic "
                f"(built by `chronos-queue weights synthetic --model {spec.id} --out DIR`)."
            )
    path = Path(settings.synthetic_dir) / spec.slug
    synthetic.build(spec, path, seed=settings.synthetic_seed)
    return Weights(str(path), "synthetic", f"synthetic checkpoint in {path}")


def _kind(path: str | Path) -> str:
    return "synthetic" if synthetic.is_synthetic(path) else "real"


def _hf_cache(spec: ModelSpec) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(spec.id, local_files_only=True)
    except LocalEntryNotFoundError:
        return None
