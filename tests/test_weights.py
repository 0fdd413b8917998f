"""Where a worker's weights come from, and the synthetic-checkpoint builder's fidelity."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from shared import catalog
from shared.catalog import Family
from shared.settings import Settings
from workers import families, synthetic
from workers.weights import WeightsNotFound, resolve

BOLT = catalog.get("amazon/chronos-bolt-tiny")


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


@pytest.fixture()
def empty_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


def test_without_cache_or_path_a_real_worker_refuses_naming_every_option(empty_hf_home):
    with pytest.raises(WeightsNotFound) as err:
        resolve(BOLT, settings(weights="real"))
    message = str(err.value)
    for option in ("MODEL_PATH", "HF_HOME", "WEIGHTS=synthetic", "chronos-queue weights synthetic"):
        assert option in message


def test_model_path_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(WeightsNotFound, match="no config.json"):
        resolve(BOLT, settings(model_path=str(tmp_path)))


def test_model_path_to_a_synthetic_checkpoint_is_labelled_synthetic(synthetic_dir):
    weights = resolve(BOLT, settings(model_path=str(synthetic_dir / BOLT.slug)))
    assert weights.kind == "synthetic" and weights.source == "MODEL_PATH"


def test_a_checkpoint_in_the_hugging_face_cache_is_served_as_real(empty_hf_home, synthetic_dir):
    # Lay the checkpoint out as huggingface_hub caches a snapshot (without the synthetic marker).
    repo = empty_hf_home / "models--amazon--chronos-bolt-tiny"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    shutil.copytree(synthetic_dir / BOLT.slug, snapshot, ignore=shutil.ignore_patterns(synthetic.MARKER))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)

    for mode in ("real", "any"):
        weights = resolve(BOLT, settings(weights=mode))
        assert weights.kind == "real" and weights.source == "Hugging Face cache"
        assert weights.path == str(snapshot)
        assert weights.revision == f"hub-{revision}"  # the hub commit keys the result cache


def test_weights_revisions_name_exactly_which_weights_a_worker_serves(synthetic_dir, tmp_path):
    built = resolve(BOLT, settings(model_path=str(synthetic_dir / BOLT.slug)))
    copy = tmp_path / "fine-tuned"
    shutil.copytree(synthetic_dir / BOLT.slug, copy, ignore=shutil.ignore_patterns(synthetic.MARKER))
    before = resolve(BOLT, settings(model_path=str(copy))).revision
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    after = resolve(BOLT, settings(model_path=str(copy))).revision

    assert built.revision == "synthetic-seed-0"
    assert before.startswith("sha256-") and after.startswith("sha256-") and before != after


def test_any_mode_falls_back_to_a_synthetic_build(empty_hf_home, tmp_path):
    weights = resolve(BOLT, settings(weights="any", synthetic_dir=str(tmp_path / "synth")))
    assert weights.kind == "synthetic"
    assert json.loads((tmp_path / "synth" / BOLT.slug / synthetic.MARKER).read_text())["model"] == BOLT.id


def test_synthetic_builds_are_deterministic_for_a_seed(tmp_path):
    def digest(path):
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    a, b, c = (synthetic.build(BOLT, tmp_path / name, seed=s) for name, s in (("a", 7), ("b", 7), ("c", 8)))
    assert digest(a) == digest(b) != digest(c)


@pytest.mark.parametrize("spec", catalog.CATALOG, ids=lambda m: m.slug)
def test_synthetic_architecture_matches_the_published_model(spec):
    family = families.of(spec)
    config_class, model_class = family.checkpoint_classes()
    config = config_class(**family.hf_config())
    with torch.device("meta"):  # shapes only: no memory, no time
        model = model_class(config)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - spec.params_m) / spec.params_m < 0.07, params
    assert (config.d_model, config.d_ff, config.num_heads, config.d_kv) == (spec.d_model, spec.d_ff, spec.heads, 64)
    assert config.num_layers == spec.encoder_layers
    chronos = config.chronos_config
    assert chronos["context_length"] == spec.context_length
    if spec.family is Family.CHRONOS2:
        assert chronos["max_output_patches"] * chronos["output_patch_size"] == spec.prediction_length
        assert chronos["quantiles"] == list(spec.native_quantiles)
    else:
        assert config.num_decoder_layers == spec.decoder_layers
        assert chronos["prediction_length"] == spec.prediction_length
