"""Each model family's adapter: one per catalog family on both sides, and the rules it declares."""

from __future__ import annotations

from shared import catalog, families
from shared.catalog import Family
from shared.schemas import ForecastParameters
from workers import families as torch_families

T5, BOLT, CHRONOS2 = (families.of(catalog.get(m)) for m in ("chronos-t5-tiny", "chronos-bolt-tiny", "chronos-2"))


def params(**kw) -> ForecastParameters:
    return ForecastParameters(**{"prediction_length": 8, **kw})


def test_every_family_has_one_adapter_on_each_side_and_the_worker_one_extends_the_shared_one():
    assert set(families.FAMILIES) == set(torch_families.FAMILIES) == set(Family)
    for family, rules in families.FAMILIES.items():
        assert issubclass(torch_families.FAMILIES[family], rules) and rules.family is family
    for spec in catalog.CATALOG:
        assert families.of(spec).spec is spec and torch_families.of(spec).family is spec.family


def test_capabilities():
    assert (T5.sample_based, BOLT.sample_based, CHRONOS2.sample_based) == (True, False, False)
    assert (T5.takes_covariates, BOLT.takes_covariates, CHRONOS2.takes_covariates) == (False, False, True)
    for spec in catalog.CATALOG:  # quantiles are output directly exactly when forecasts are not sampled
        assert (spec.native_quantiles is None) == families.of(spec).sample_based


def test_passes_are_shared_by_autoregressive_rounds_and_for_chronos2_by_horizon():
    for family in (T5, BOLT):
        native = family.spec.prediction_length
        one, full, over = (family.group_key(params(prediction_length=h)) for h in (1, native, native + 1))
        assert one == full != over
    assert CHRONOS2.group_key(params(prediction_length=8)) != CHRONOS2.group_key(params(prediction_length=9))


def test_t5_shares_a_pass_only_with_the_same_sampling_and_never_when_seeded():
    assert T5.group_key(params(num_samples=10)) != T5.group_key(params(num_samples=20))
    assert T5.group_key(params(temperature=0.5), "a") == T5.group_key(params(temperature=0.5), "b")
    assert T5.group_key(params(seed=1), "a") != T5.group_key(params(seed=1), "b")


def test_t5_batches_shrink_as_samples_grow_past_the_reference():
    assert T5.batch_limit(16, params()) == T5.batch_limit(16, params(num_samples=5)) == 16
    assert T5.batch_limit(16, params(num_samples=40)) == 8
    assert T5.batch_limit(16, params(num_samples=1000)) == 1
    assert BOLT.batch_limit(16, params()) == CHRONOS2.batch_limit(16, params()) == 16


def test_only_deterministic_requests_are_cacheable():
    assert BOLT.cacheable({}) and CHRONOS2.cacheable({})
    assert not T5.cacheable({}) and not T5.cacheable({"seed": None}) and T5.cacheable({"seed": 0})
