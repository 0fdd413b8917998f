"""One adapter per model family: what a family can take and how its work may be shared, declared once.

The catalog (shared/catalog.py) says which family each model belongs to; `of(spec)` returns the
family's adapter bound to that model, and nothing else in the code branches on the family. This
module holds the rules both sides apply: the API validates and caches with them, the workers
schedule with them. workers/families.py extends each adapter with the torch side (the forward
pass, synthetic checkpoints), keyed by the same `Family`. No torch here: the API imports this.

Capabilities are class attributes, as in chronos-forecasting's pipelines:
- `sample_based`: forecasts are drawn sample paths, so sampling options (num_samples,
  temperature, top_k, top_p), `seed` and `return_samples` apply, and a result is reproducible
  only with a seed. Otherwise the model outputs quantiles directly and is deterministic.
- `takes_covariates`: past/future covariates and several target variates per series.
- `cross_learning`: the series of one request can be forecast jointly, as one group.
- `fine_tunable`: the pipeline can be fine-tuned (`fit`), so fine-tuning jobs take it as a base.
"""

from __future__ import annotations

import functools
from typing import ClassVar

from shared.catalog import Family, ModelSpec
from shared.schemas import ForecastParameters


class ModelFamily:
    """The rules of one family, bound to one catalog model (`spec`). Defaults: a deterministic,
    univariate model that outputs quantiles and is autoregressive beyond its native horizon."""

    family: ClassVar[Family]
    sample_based: ClassVar[bool] = False
    takes_covariates: ClassVar[bool] = False
    cross_learning: ClassVar[bool] = False
    fine_tunable: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def group_key(self, params: ForecastParameters, job_id: str = "") -> tuple:
        """What a job's series must share with others to run in the same forward pass. A pass runs
        the longest horizon and the union of quantile levels of its jobs, and each job gets its own
        slice, so the key holds whatever would make that slice differ from the job's result alone.
        Here: the number of autoregressive rounds beyond the native horizon. Each quantile level
        is computed independently and the native horizon always in full, so a slice equals what
        the job would get alone (up to the float noise of left-padding to the longest series)."""
        return (self._rounds(params),)

    def batch_limit(self, max_batch: int, params: ForecastParameters) -> int:
        """Series per forward pass for these parameters, given the worker's `max_batch` (the
        catalog's `max_batch(device)` or MAX_BATCH, lowered after an out-of-memory)."""
        return max_batch

    def cacheable(self, parameters: dict) -> bool:
        """Whether an identical request may be answered from the result cache (shared/cache.py) or
        join an identical one in flight (single-flight, api/service.py): `parameters` as stored with the job."""
        return True

    def _rounds(self, params: ForecastParameters) -> int:
        return (params.prediction_length - 1) // self.spec.prediction_length


class T5(ModelFamily):
    """Chronos (T5): an encoder-decoder over tokenized values that samples paths step by step;
    quantiles and mean are taken over the samples."""

    family = Family.T5
    sample_based = True
    # The sample count the catalog's batch limits are set for (a T5 checkpoint's default
    # num_samples): memory grows with batch x samples.
    reference_samples: ClassVar[int] = 20

    def group_key(self, params: ForecastParameters, job_id: str = "") -> tuple:
        """Rounds and the same sampling options: a slice of a shared pass is then a draw from the
        same distribution. A seeded job runs in passes of its own (its `job_id` in the key), so its
        samples never depend on other jobs."""
        return (
            self._rounds(params),
            tuple(sorted(params.sampling().items())),
            *((params.seed, job_id) if params.seed is not None else ()),
        )

    def batch_limit(self, max_batch: int, params: ForecastParameters) -> int:
        """Scaled down as samples per series go past `reference_samples`."""
        if params.num_samples:
            return max(1, max_batch * self.reference_samples // max(params.num_samples, self.reference_samples))
        return max_batch

    def cacheable(self, parameters: dict) -> bool:
        """Only a seeded request: otherwise each answer is a fresh draw."""
        return parameters.get("seed") is not None


class Bolt(ModelFamily):
    """Chronos-Bolt: a T5 encoder-decoder over patches that outputs quantiles directly, all the
    defaults of `ModelFamily`."""

    family = Family.BOLT


class Chronos2(ModelFamily):
    """Chronos-2: an encoder-only model that outputs quantiles directly and takes covariates and
    several target variates per series."""

    family = Family.CHRONOS2
    takes_covariates = True
    cross_learning = True
    fine_tunable = True

    def group_key(self, params: ForecastParameters, job_id: str = "") -> tuple:
        """The horizon itself: it sets how many output patches the encoder attends to, so it changes
        every step's forecast a little; only equal horizons share a pass, so a job's result never
        depends on its company. (Series of different input schemas still share a pass: the worker
        splits it into one call per schema.) A cross-learning job's series attend to each other, so
        they run in passes of their own: no other job's series ever join their group."""
        if params.cross_learning:
            return (params.prediction_length, "cross-learning", job_id)
        return (params.prediction_length,)

    def batch_limit(self, max_batch: int, params: ForecastParameters) -> int:
        """A cross-learning job's group is all its series (at most CROSS_LEARNING_MAX_SERIES, checked
        by the API), so its one pass takes them all, past `max_batch` if need be: split into passes,
        the group and with it every forecast would change."""
        return max_batch if not params.cross_learning else max(max_batch, 1 << 20)


FAMILIES: dict[Family, type[ModelFamily]] = {cls.family: cls for cls in (T5, Bolt, Chronos2)}


@functools.cache
def of(spec: ModelSpec) -> ModelFamily:
    """The adapter of `spec`'s family, bound to `spec`."""
    return FAMILIES[spec.family](spec)
