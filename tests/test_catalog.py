"""The catalog is the one table of models; queue names and sync defaults derive from it."""

from __future__ import annotations

import pytest

from shared import catalog
from shared.store import keys
from shared.settings import Settings


def test_every_model_has_a_unique_slug_that_names_its_queue():
    slugs = [m.slug for m in catalog.CATALOG]
    assert len(set(slugs)) == len(slugs) == 10
    for spec in catalog.CATALOG:
        assert keys.queue(spec) == spec.id.rsplit("/", 1)[-1]
        assert keys.worker_queues(spec) == (f"{spec.slug}.sync", spec.slug)


def test_models_are_found_by_id_or_slug():
    assert catalog.get("chronos-bolt-small") is catalog.get("amazon/chronos-bolt-small")
    assert catalog.find("amazon/chronos-t5-huge") is None
    with pytest.raises(KeyError, match="known: amazon/chronos-t5-tiny"):
        catalog.get("nope")


def test_t5_tiny_and_every_bolt_are_sync_eligible_by_default():
    eligible = {m.slug for m in catalog.CATALOG if Settings(_env_file=None).sync_eligible(m)}
    assert eligible == {
        "chronos-t5-tiny",
        "chronos-bolt-tiny",
        "chronos-bolt-mini",
        "chronos-bolt-small",
        "chronos-bolt-base",
    }


def test_sync_models_setting_overrides_eligibility():
    settings = Settings(_env_file=None, sync_models="chronos-t5-small, amazon/chronos-bolt-tiny")
    eligible = {m.slug for m in catalog.CATALOG if settings.sync_eligible(m)}
    assert eligible == {"chronos-t5-small", "chronos-bolt-tiny"}


def test_sync_models_setting_rejects_unknown_models():
    with pytest.raises(ValueError, match="unknown model.*chronos-t5-huge"):
        Settings(_env_file=None, sync_models="chronos-t5-huge")


def test_t5_batch_limits_are_lower_than_bolt_and_higher_on_cuda():
    for spec in catalog.CATALOG:
        assert spec.max_batch("cuda") >= spec.max_batch("cpu") >= 1
    assert catalog.get("amazon/chronos-t5-large").max_batch("cuda") < catalog.get("amazon/chronos-bolt-base").max_batch(
        "cuda"
    )
