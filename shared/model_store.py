"""The model store: where fine-tuned models live (MODEL_STORE), one directory per model.

A directory holds the weights as `Chronos2Pipeline.fit` saved them (`weights/`: a LoRA adapter,
or a full checkpoint) and `manifest.json` (id, base model and its weights revision, owner, mode,
created, metrics, the training attempt that made it). A training worker writes a model under a
temporary name and renames it into place only when complete, then registers it in Redis
(`keys.FINETUNED`, lua/register.lua, while its claim holds the job): a model is listed,
routed to and loaded only once whole. Inference workers of the base model load it from here
(workers/runtime.py); the API deletes it, as does a training worker whose job did not succeed.
No torch here: the API imports this.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shared.catalog import ModelSpec

MANIFEST = "manifest.json"
WEIGHTS = "weights"
# A fine-tuned model's id: its base model's id, then this, then the job's short id.
MARK = ":ft-"


def model_id(base: ModelSpec, job_id: str) -> str:
    return f"{base.id}{MARK}{job_id[:12]}"


def is_finetuned(name: str) -> bool:
    return MARK in name


def base_of(name: str) -> str:
    """The base model's id of a fine-tuned model id."""
    return name.split(MARK, 1)[0]


def path(root: str | Path, name: str) -> Path:
    """The model's directory: its id with the characters a path cannot hold replaced."""
    return Path(root) / name.replace("/", "--").replace(":", "--")


def staging(root: str | Path, job_id: str, attempt: int) -> Path:
    """Where a training attempt writes, before the rename that publishes it (one per claim: a later
    run clears its predecessors', and a run a later delivery took over, still going, touches only
    its own and stops at its next step, workers/training.py)."""
    return Path(root) / f".staging-{job_id}-{attempt}"


def publish(staged: Path, final: Path, manifest: dict) -> None:
    """Write the manifest, then move the whole directory into place in one rename."""
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=1))
    # An earlier attempt published, then its worker died before finishing the job, or it was
    # superseded and is clearing its own (`delete` with its attempt) at this moment.
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    staged.rename(final)


def manifest(root: str | Path, name: str) -> dict | None:
    try:
        return json.loads((path(root, name) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def delete(root: str | Path, name: str, attempt: int | None = None) -> None:
    """Delete a model's directory; with `attempt`, only if that training attempt made it (its
    manifest says so): a later attempt's model under the same name stays."""
    if attempt is not None and (manifest(root, name) or {}).get("attempt") != attempt:
        return
    shutil.rmtree(path(root, name), ignore_errors=True)
