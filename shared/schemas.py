"""Request and response bodies of the native API (docs/api.md), the single statement of each shape.

Requests follow the SageMaker/AutoGluon Chronos endpoint convention:
`{"model", "inputs": [{"target", "item_id"?, "start"?}], "parameters": {...}}`.
Limits that depend on configuration (series count, horizon, ...) are checked by
`api.limits`, not here, so these models stay usable by clients too.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.store import JobKind, JobRecord, JobStatus, Lane

DEFAULT_QUANTILES = [0.1, 0.5, 0.9]


def finite_with_an_observation(values: list[float | None]) -> list[float | None]:
    """A series' values: at least one observed, none infinite (null or NaN marks a missing value)."""
    observed = [x for x in values if x is not None and not math.isnan(x)]
    if not observed:
        raise ValueError("holds no observed value (all null/NaN)")
    if not all(map(math.isfinite, observed)):
        raise ValueError("holds an infinite value; use null or NaN for missing values")
    return values


CallbackUrl = Annotated[
    str | None,
    Field(
        max_length=2048,
        description="POSTed the job's final status when it ends, HMAC-signed (X-Chronos-Signature); only URLs "
        "the operator allows (CALLBACK_ALLOWED_URLS).",
    ),
]
Values = list[float | None]
# A covariate is numeric (null/NaN: missing) or categorical (strings; null: missing).
Covariate = list[float | None] | list[str | None]


class SeriesInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: Values | list[Values] = Field(
        min_length=1,
        description="Observed values, oldest first; null or NaN marks a missing value. A list of lists is "
        "several target variates of one series, forecast jointly (Chronos-2 only); they share one length.",
    )
    item_id: str | None = Field(None, max_length=256)
    start: str | None = Field(None, max_length=64, description="Timestamp of the first value (echoed back).")
    past_covariates: dict[str, Covariate] | None = Field(
        None,
        description="Chronos-2 only. Covariates observed alongside the target, by name, each as long as the target.",
    )
    future_covariates: dict[str, Covariate] | None = Field(
        None,
        description="Chronos-2 only. Known future values of some past covariates (same names), each "
        "`prediction_length` long.",
    )

    @field_validator("target")
    @classmethod
    def _observed(cls, target: list) -> list:
        if target and isinstance(target[0], list):
            if len({len(variate) for variate in target}) != 1 or not target[0]:
                raise ValueError("target variates must be non-empty and share one length")
            for variate in target:
                finite_with_an_observation(variate)
            return target
        return finite_with_an_observation(target)

    @property
    def multivariate(self) -> bool:
        return isinstance(self.target[0], list)

    @property
    def length(self) -> int:
        """Points per variate."""
        first = self.target[0]
        return len(first) if isinstance(first, list) else len(self.target)


class ForecastParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_length: int = Field(ge=1, description="Steps to forecast.")
    quantile_levels: list[float] = Field(default_factory=lambda: list(DEFAULT_QUANTILES), min_length=1)
    freq: str | None = Field(None, max_length=16, description="Pandas frequency string (echoed back).")
    num_samples: int | None = Field(None, ge=1, description="Sample paths (T5 models only; default 20).")
    temperature: float | None = Field(None, gt=0, description="Sampling temperature (T5 models only).")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling (T5 models only).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (T5 models only).")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1,
        description="T5 models only: fixes the sampling, so the same request gives the same forecast (and is cached).",
    )  # fmt: skip
    return_samples: bool = Field(
        False, description="Also return the sample paths as `samples` (T5 models only: Bolt outputs quantiles)."
    )
    cross_learning: bool = Field(
        False,
        description="Chronos-2 only: forecast this request's series jointly, as one group whose series attend to "
        "each other (related series inform each other's forecasts). The series of one request only: they never "
        "share a group with another request's. At most CROSS_LEARNING_MAX_SERIES series, one input schema.",
    )
    allow_fallback: bool = Field(
        False,
        description="An async job may be sent down the model's fallback chain (FALLBACKS) when the model has no live "
        "worker or its circuit is open; sync calls always are.",
    )
    weights_revision: str | None = Field(
        None, max_length=128,
        description="Only a worker serving this weights revision (GET /v1/models/{id}/versions) runs the job; 503 "
        "`no-worker` when none is live.",
    )  # fmt: skip
    ensemble_members: bool = Field(
        False, description="Ensembles only: also return each member model's own forecast, as `members`."
    )
    ensemble_partial: bool = Field(
        False, description="Ensembles only: a failed member is left out of the combination instead of failing it."
    )

    def sampling(self) -> dict[str, float | int]:
        """The sampling options that were set (they apply to sample-based models only)."""
        return {
            name: value
            for name in ("num_samples", "temperature", "top_k", "top_p")
            if (value := getattr(self, name)) is not None
        }

    @field_validator("quantile_levels")
    @classmethod
    def _open_unit_interval(cls, levels: list[float]) -> list[float]:
        bad = [q for q in levels if not 0.0 < q < 1.0]
        if bad:
            raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {bad}")
        if len(set(levels)) != len(levels):
            raise ValueError("quantile levels must be unique")
        return levels


class ForecastRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "amazon/chronos-bolt-tiny",
                    "inputs": [{"item_id": "a", "target": [1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0, 2.0]}],
                    "parameters": {"prediction_length": 4, "quantile_levels": [0.1, 0.5, 0.9]},
                }
            ]
        },
    )

    model: str = Field(description="Catalog id (amazon/chronos-bolt-small) or slug (chronos-bolt-small).")
    inputs: list[SeriesInput] = Field(min_length=1)
    parameters: ForecastParameters
    callback_url: CallbackUrl = None


class _DesignRequest(BaseModel):
    """What the bodies of `/predict` and `/predict/batch` share with `ForecastRequest`'s."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Catalog id (amazon/chronos-bolt-small) or slug (chronos-bolt-small).")
    parameters: ForecastParameters
    callback_url: CallbackUrl = None


class PredictRequest(_DesignRequest):
    """`POST /predict`: one series. The native `inputs` list is also taken, holding one series."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "amazon/chronos-bolt-tiny",
                    "input": {"item_id": "a", "target": [1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0, 2.0]},
                    "parameters": {"prediction_length": 4, "quantile_levels": [0.1, 0.5, 0.9]},
                }
            ]
        },
    )

    input: SeriesInput


class BatchPredictRequest(_DesignRequest):
    """`POST /predict/batch`: many series as `requests` (the native name, `inputs`, is also taken)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "amazon/chronos-bolt-tiny",
                    "requests": [{"item_id": "a", "target": [1.0, 2.0, 3.0, 2.0, 1.0]},
                                 {"item_id": "b", "target": [5.0, 4.0, 6.0, 5.0]}],
                    "parameters": {"prediction_length": 4},
                }
            ]
        },
    )  # fmt: skip

    requests: list[SeriesInput] = Field(min_length=1)


class Origins(BaseModel):
    """Forecast origins: an origin is how many points of the series are known when forecasting."""

    model_config = ConfigDict(extra="forbid")

    first: int = Field(ge=1, description="First origin (at least 1: one observed point).")
    last: int = Field(ge=1, description="Last origin, included (at most the series' length).")
    step: int = Field(1, ge=1)

    def values(self) -> range:
        return range(self.first, self.last + 1, self.step)


class BacktestRequest(BaseModel):
    """Rolling-origin evaluation of one series as one job: a forecast from every origin, scored
    against the actuals the series holds."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "amazon/chronos-bolt-tiny",
                    "series": {"item_id": "SPY", "target": [float(100 + (t % 9)) for t in range(40)]},
                    "origins": {"first": 30, "last": 39, "step": 1},
                    "context_length": 30,
                    "parameters": {"prediction_length": 5, "quantile_levels": [0.1, 0.5, 0.9]},
                }
            ]
        },
    )

    model: str = Field(description="Catalog id or slug.")
    series: SeriesInput = Field(
        description="The whole series, oldest first. Chronos-2 also takes `past_covariates` spanning it."
    )
    origins: Origins
    context_length: int | None = Field(
        None, ge=1, description="Points before each origin given to the model (default: the model's context)."
    )
    known_covariates: list[str] = Field(
        default_factory=list,
        description="Chronos-2: past covariates whose values after each origin are known in advance "
        "(given to the model as future covariates).",
    )
    season_length: int = Field(1, ge=1, description="Season of the naive forecast that scales MASE.")
    parameters: ForecastParameters = Field(description="As for a forecast; the median (0.5) is always returned.")
    callback_url: CallbackUrl = None


class AnomalyParameters(BaseModel):
    """How an anomaly job scores its series: each scored point against the central interval of the
    model's forecast of it, made from the points before it."""

    model_config = ConfigDict(extra="forbid")

    level: float = Field(
        0.8, ge=0.01, le=0.998,
        description="Width of the central interval, e.g. 0.99 for quantiles 0.005 and 0.995. Bolt models "
        "output quantiles 0.1-0.9 (level at most 0.8), Chronos-2 0.01-0.99 (at most 0.98); T5 models "
        "take any level (quantiles of `num_samples` sample paths: tails need more samples).",
    )  # fmt: skip
    context_length: int | None = Field(
        None, ge=1, description="Points before each scored point given to the model (default: the model's context)."
    )
    score_from: int | None = Field(
        None, ge=1,
        description="Index of the first point to score, in every series (default: `context_length`, or the "
        "model's context length capped to leave one point to score). Scoring only the last N points of a "
        "series (online use) is `score_from = len - N`.",
    )  # fmt: skip
    horizon: int = Field(
        1, ge=1,
        description="Steps forecast from each origin; origins are `horizon` points apart, so each scored point "
        "is forecast once, 1 to `horizon` steps ahead. 1 (the default) is the most sensitive; larger horizons "
        "need `horizon` times fewer forecasts.",
    )  # fmt: skip
    num_samples: int | None = Field(None, ge=1, description="Sample paths (T5 models only; default 20).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="T5 models only: fixes the sampling.")

    def context(self, model_context: int) -> int:
        """Points before an origin given to the model."""
        return min(self.context_length or model_context, model_context)

    def first_scored(self, length: int, model_context: int) -> int:
        """Index of a series' first scored point: `score_from`, or after the first `context_length`
        points, or (neither given) after the model's context, capped to leave one point to score."""
        if self.score_from is not None:
            return self.score_from
        if self.context_length is not None:
            return self.context_length
        return max(1, min(model_context, length - 1))

    def bounds(self) -> tuple[float, float]:
        """The interval's quantile levels."""
        return round((1 - self.level) / 2, 10), round((1 + self.level) / 2, 10)

    def forecast(self) -> ForecastParameters:
        """The forecast each origin runs: the interval's bounds and the median."""
        lower, upper = self.bounds()
        return ForecastParameters(
            prediction_length=self.horizon, quantile_levels=sorted({lower, 0.5, upper}),
            num_samples=self.num_samples, seed=self.seed,
        )  # fmt: skip


class AnomalyRequest(BaseModel):
    """Anomaly detection: flag the points of each series that fall outside the model's forecast interval."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "amazon/chronos-bolt-tiny",
                    "inputs": [{"item_id": "cpu", "target": [*(float(10 + t % 5) for t in range(40)), 90.0, 12.0]}],
                    "parameters": {"level": 0.8, "context_length": 32},
                }
            ]
        },
    )

    model: str = Field(description="Catalog id or slug.")
    inputs: list[SeriesInput] = Field(min_length=1, description="Series as for a forecast: one target variate each.")
    parameters: AnomalyParameters = Field(default_factory=AnomalyParameters)
    callback_url: CallbackUrl = None


class FinetuneParameters(BaseModel):
    """How a fine-tuning job trains (`Chronos2Pipeline.fit`)."""

    model_config = ConfigDict(extra="forbid")

    prediction_length: int = Field(ge=1, description="Horizon the model is fine-tuned for.")
    context_length: int | None = Field(
        None, ge=1, description="Longest context seen in training (default: the model's context length)."
    )
    finetune_mode: Literal["lora", "full"] = Field(
        "lora", description="`lora`: low-rank adapters (a few MB, fast); `full`: every weight."
    )
    num_steps: int = Field(100, ge=1, description="Optimizer steps (at most MAX_FINETUNE_STEPS).")
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="Default: 1e-5 for lora, 1e-6 for full (the library's advice)."
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Series (targets and covariates) per step.")
    validation: bool = Field(
        True,
        description="Hold out the last `prediction_length` points of each series: training never sees them, "
        "and the base and fine-tuned models are scored on them (WQL, MASE).",
    )

    def rate(self) -> float:
        return self.learning_rate or (1e-5 if self.finetune_mode == "lora" else 1e-6)


class FinetuneRequest(BaseModel):
    """Fine-tune a base model on the caller's series; the result is a model only its owner can use."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "amazon/chronos-2",
                    "inputs": [{"item_id": "store-1", "target": [float(20 + (t % 7)) for t in range(120)]}],
                    "parameters": {"prediction_length": 8, "finetune_mode": "lora", "num_steps": 50},
                }
            ]
        },
    )

    model: str = Field(description="The base model (amazon/chronos-2).")
    inputs: list[SeriesInput] = Field(
        min_length=1, description="Training series as for a forecast (targets, past covariates)."
    )
    parameters: FinetuneParameters
    callback_url: CallbackUrl = None


class Timings(BaseModel):
    queued_s: float | None = None
    inference_s: float | None = None
    total_s: float | None = None


class Progress(BaseModel):
    done: int = Field(description="Series (for a backtest or an anomaly job: origins) forecast so far.")
    total: int


class CallbackView(BaseModel):
    url: str
    status: str = Field(description="pending, delivered, or failed (after the last attempt).")
    attempts: int
    error: str | None = Field(None, description="Why the last attempt failed.")


class JobView(BaseModel):
    """A job as the API shows it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "5d0c7a0e6b6f4f0f9a1f3c2b8e7d6a51", "status": "succeeded",
                    "model": "amazon/chronos-bolt-tiny", "served_by": "amazon/chronos-bolt-tiny", "lane": "sync",
                    "n_series": 1, "prediction_length": 3,
                    "created_at": 1763900000.012, "started_at": 1763900000.018, "finished_at": 1763900000.034,
                    "attempts": 1, "weights": "real", "error": None, "cancel_requested": False,
                    "timings": {"queued_s": 0.006, "inference_s": 0.015, "total_s": 0.022},
                    "predictions": [{"item_id": "a", "mean": [2.1, 2.4, 2.2], "0.1": [1.2, 1.3, 1.1],
                                     "0.5": [2.1, 2.4, 2.2], "0.9": [3.0, 3.4, 3.3]}],
                }
            ]
        }
    )  # fmt: skip

    id: str
    kind: JobKind = JobKind.FORECAST
    status: JobStatus
    model: str = Field(description="The model asked for.")
    served_by: str = Field(
        description="The model that ran the job: `model`, or another one (a fallback, an A/B candidate)."
    )
    lane: Lane
    n_series: int
    prediction_length: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    weights: str | None = Field(None, description="'real' or 'synthetic' (synthetic forecasts are meaningless).")
    error: str | None = None
    cancel_requested: bool = False
    cached: bool = Field(False, description="Answered from the result cache (an identical earlier request).")
    callback: CallbackView | None = None
    timings: Timings
    progress: Progress | None = Field(
        None, description="Series forecast so far (origins, for a backtest or an anomaly job; steps, for fine-tuning)."
    )
    finetune: dict[str, Any] | None = Field(
        None,
        description="A fine-tuning job: `losses` (training loss per step), `mode`, and once it succeeded "
        "`metrics` (`base` and `finetuned`: WQL and MASE on the held-out points, with validation).",
    )
    finetuned_model: str | None = Field(
        None, description="A succeeded fine-tuning job: the id of the new model (usable by its owner only)."
    )
    # Before `predictions` and `backtest`: api/render.py streams a large answer by splicing them in last.
    anomalies: list[dict[str, Any]] | None = Field(
        None,
        description="A succeeded anomaly job: one entry per series with item_id, `start` (index of the first "
        "scored point) and equal-length lists `lower`, `upper`, `median`, `anomaly` (booleans) and `score` (how "
        "far outside the interval, in interval widths; 0 inside; null where the actual is missing).",
    )
    members: list[dict[str, Any]] | None = Field(
        None,
        description="An ensemble's job with `ensemble_members`: each member's model, served_by, job_id and, once "
        "it succeeded, predictions.",
    )
    predictions: list[dict[str, Any]] | None = Field(
        None, description="One entry per input series: item_id, mean, and one key per requested quantile level."
    )
    backtest: dict[str, Any] | None = Field(
        None,
        description="A succeeded backtest: `metrics` (mase, wql, coverage, mae, points_scored) and `forecasts`, "
        "one per origin (origin, and one key per quantile level, 0.5 included).",
    )

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        return cls(
            id=record.id,
            kind=record.kind,
            status=record.status,
            # A fine-tuned model is asked for by name and served by its base model's workers.
            model=record.requested or record.request.get("finetuned") or record.model,
            served_by=record.request.get("finetuned") or record.model,
            lane=record.lane,
            n_series=record.n_series,
            prediction_length=record.prediction_length,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            attempts=record.attempts,
            weights=record.weights,
            error=record.error,
            cancel_requested=record.cancel_requested,
            cached=record.cached,
            callback=CallbackView(
                url=record.callback_url,
                status=record.callback_status or "pending",
                attempts=record.callback_attempts,
                error=record.callback_error,
            )
            if record.callback_url
            else None,
            timings=Timings(**record.timings()),
            progress=Progress(done=record.progress_done, total=record.n_series),
            finetune=record.finetune,
            finetuned_model=(record.finetune or {}).get("finetuned_model"),
            anomalies=record.anomalies,
            predictions=record.predictions,
            backtest=record.backtest,
        )


class WorkerView(BaseModel):
    name: str
    weights: str
    revision: str | None = Field(
        None, description="Which weights exactly: hub commit, synthetic seed, or content digest."
    )
    device: str
    dtype: str
    started_at: float
    last_seen: float


class ModelView(BaseModel):
    id: str
    slug: str
    family: str
    queue: str
    sync_queue: str
    context_length: int
    prediction_length: int = Field(description="Native horizon; longer horizons are forecast autoregressively.")
    sample_based: bool
    native_quantiles: list[float] | None
    sync_eligible: bool
    queue_depth: int
    sync_queue_depth: int
    workers_online: int
    weights: str | None = Field(description="'real', 'synthetic', 'mixed', or null when no worker is online.")
    workers: list[WorkerView]
    base_model: str | None = Field(
        None,
        description="A fine-tuned model (listed for its owner only): the catalog model it was tuned from, "
        "whose workers serve it.",
    )
    finetune: dict[str, Any] | None = Field(
        None, description="A fine-tuned model: mode, created_at, base_revision and the validation metrics."
    )
    circuit: str = Field(
        "closed", description="The model's circuit breaker: closed, open (sync calls refused) or half_open (probing)."
    )
    members: list[str] | None = Field(
        None, description="An ensemble (family `ensemble`, POST /v1/predict only): its member models."
    )
    combine: str | None = Field(None, description="An ensemble: how its members' quantiles combine (median, mean).")


class VersionView(BaseModel):
    """One weights revision a model's workers serve or served (GET /v1/models/{id}/versions)."""

    revision: str = Field(description="What `parameters.weights_revision` pins: hub-<commit>, synthetic-seed-<n>, "
                          "or sha256-<digest of the checkpoint files>.")  # fmt: skip
    kind: str = Field(description="hub (a Hugging Face commit), synthetic (a seed), or digest (local files).")
    active: bool = Field(description="Served by a live worker now.")
    workers: int = Field(description="Live workers serving it.")
    first_seen: float = Field(description="When a worker first reported it (Unix time).")
    last_seen: float = Field(description="When a worker last reported it.")
