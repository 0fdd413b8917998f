"""Configured request limits and what each model accepts: a body over the size cap is 413; a field over
a limit, or input the model cannot take (covariates outside Chronos-2, sampling options outside T5), is 422."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shared import families
from shared.catalog import ModelSpec
from shared.schemas import AnomalyParameters, BacktestRequest, FinetuneParameters, ForecastParameters
from shared.series import SeriesSet
from shared.settings import Settings

from api.problems import Problem

# Models compute in float32: a finite float64 beyond this would become infinite there.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check(
    series: SeriesSet,
    params: ForecastParameters,
    spec: ModelSpec,
    settings: Settings,
    field: Callable[[int], str] = lambda i: f"inputs[{i}]",
) -> None:
    """Raise a 422 `Problem` naming the first invalid field, field over its configured limit, or
    input this model cannot take. Every check runs vectorized over all values at once.
    `field(i)` names series i in the request (a backtest's single series is `series`)."""
    check_values(series, field)
    if len(series) > settings.max_series:
        raise _over("inputs", f"{len(series)} series; at most {settings.max_series} per request")
    # The longest row is the longest series (a series' variates share one length); which series it
    # is only matters for the error.
    if len(series) and series.row_lengths.max() > settings.max_points:
        lengths = series.lengths()
        longest = int(lengths.argmax())
        raise _over(f"{field(longest)}.target", f"{int(lengths[longest])} points; at most {settings.max_points}")
    _check_covariates(series, params.prediction_length, spec, settings, field)
    if params.prediction_length > settings.max_prediction_length:
        raise _over(
            "parameters.prediction_length",
            f"{params.prediction_length} steps; at most {settings.max_prediction_length}",
        )
    if len(params.quantile_levels) > settings.max_quantile_levels:
        raise _over(
            "parameters.quantile_levels",
            f"{len(params.quantile_levels)} levels; at most {settings.max_quantile_levels}",
        )
    if params.num_samples is not None and params.num_samples > settings.max_num_samples:
        raise _over("parameters.num_samples", f"{params.num_samples} samples; at most {settings.max_num_samples}")
    offending = [*params.sampling(), *(["seed"] if params.seed is not None else []),
                 *(["return_samples"] if params.return_samples else [])]  # fmt: skip
    if offending and not families.of(spec).sample_based:
        name = f"parameters.{offending[0]}"
        raise Problem(
            422,
            "not-sample-based",
            f"{name}: {spec.id} outputs quantiles directly; sampling options apply to T5 models only",
            field=name,
        )
    if params.cross_learning:
        _check_cross_learning(series, spec, settings, field)
    samples = (params.num_samples or 20) if params.return_samples else 0
    outputs = series.n_rows * params.prediction_length * (1 + len(params.quantile_levels) + samples)
    if outputs > settings.max_output_values:
        raise _over(
            "parameters.prediction_length",
            f"the answer would hold {outputs} values (series x variates x horizon x (1 + levels + samples)); "
            f"at most {settings.max_output_values} per request (MAX_OUTPUT_VALUES)",
        )


def check_values(series: SeriesSet, field: Callable[[int], str]) -> None:
    """Every target row non-empty, with an observation, nothing infinite or beyond float32 (422 naming it)."""
    lengths, values = series.row_lengths, series.values
    # The usual case in two reductions, with no array allocated: every row has a value, and every
    # value lies within float32's range (a NaN or an infinity fails one of the comparisons). One
    # series' check costs a POST ~10 numpy calls less than the general path below.
    if len(values) and lengths.min() > 0 and -FLOAT32_MAX <= values.min() and values.max() <= FLOAT32_MAX:
        return
    row_series = np.repeat(np.arange(len(series)), series.variates)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise _invalid(f"{field(int(row_series[empty[0]]))}.target", "must hold at least one value")
    finite = np.isfinite(values)
    if finite.all():  # nothing missing, so every row has observations
        if values.dtype != np.float32 and len(values) and np.abs(values).max() > FLOAT32_MAX:
            _beyond_float32(series, field, row_series, np.abs(values) > FLOAT32_MAX)
        return
    missing = np.isnan(values)
    where = np.flatnonzero(~finite & ~missing)  # only NaN (missing) may be non-finite
    if len(where):
        row = int(np.searchsorted(series.offsets, where[0], side="right")) - 1
        raise _invalid(
            f"{field(int(row_series[row]))}.target", "holds an infinite value; use null or NaN for missing values"
        )
    if values.dtype != np.float32 and len(values):  # float32 input cannot leave float32's range
        _beyond_float32(series, field, row_series, np.abs(np.where(finite, values, 0.0)) > FLOAT32_MAX)
    if len(values):
        observed = np.logical_or.reduceat(~missing, series.offsets[:-1])
        blank = np.flatnonzero(~observed)
        if len(blank):
            raise _invalid(f"{field(int(row_series[blank[0]]))}.target", "holds no observed value (all null/NaN)")


def _beyond_float32(series: SeriesSet, field: Callable[[int], str], row_series: np.ndarray, bad: np.ndarray) -> None:
    where = np.flatnonzero(bad)
    if len(where):
        row = int(np.searchsorted(series.offsets, where[0], side="right")) - 1
        raise _invalid(
            f"{field(int(row_series[row]))}.target",
            f"holds a value beyond float32's range (±{FLOAT32_MAX:.3g}), which the models compute in",
        )


def check_backtest(request: BacktestRequest, series: SeriesSet, spec: ModelSpec, settings: Settings) -> None:
    """A backtest: its series as a forecast's, its origins inside the series, within the configured limits."""
    check(series, request.parameters, spec, settings, field=lambda i: "series")
    if series.multivariate or (request.series.target and isinstance(request.series.target[0], list)):
        raise _unsupported("series.target", "a backtest scores one target variate")
    if request.series.future_covariates:
        raise _invalid("series.future_covariates", "give every covariate's whole history in past_covariates; "
                       "name the ones known in advance in known_covariates")  # fmt: skip
    for i, name in enumerate(request.known_covariates):
        if name not in (request.series.past_covariates or {}):
            raise _invalid(f"known_covariates[{i}]", f"{name!r} is not among series.past_covariates")
    origins = request.origins
    length = int(series.lengths()[0])
    if origins.last < origins.first:
        raise _invalid("origins.last", f"{origins.last} comes before origins.first ({origins.first})")
    if origins.last > length:
        raise _invalid("origins.last", f"{origins.last} is past the series' end ({length} points)")
    count = len(origins.values())
    if count > settings.max_backtest_origins:
        raise _over("origins", f"{count} origins; at most {settings.max_backtest_origins}")


def _check_cross_learning(series: SeriesSet, spec: ModelSpec, settings: Settings, field: Callable[[int], str]) -> None:
    """One group in one forward pass: a family that groups series, a group within its cap, one
    input schema (the pipeline takes one per call, so two schemas would be two groups)."""
    name = "parameters.cross_learning"
    if not families.of(spec).cross_learning:
        raise _unsupported(name, f"{spec.id} forecasts each series on its own; amazon/chronos-2 can cross-learn")
    if len(series) > settings.cross_learning_max_series:
        raise _over(
            "inputs",
            f"{len(series)} series; at most {settings.cross_learning_max_series} per cross-learning request "
            "(CROSS_LEARNING_MAX_SERIES)",
        )
    covariates = series.covariates or [None] * len(series)

    def schema(i: int) -> tuple:
        cov = covariates[i] or {}
        return int(series.variates[i]), sorted(cov.get("past", {})), sorted(cov.get("future", {}))

    first = schema(0)
    for i in range(1, len(series)):
        if schema(i) != first:
            raise _invalid(
                field(i), "with cross_learning every series needs the same target variates and covariate names"
            )


def check_anomalies(
    series: SeriesSet, params: AnomalyParameters, spec: ModelSpec, settings: Settings
) -> tuple[list[int], int]:
    """An anomaly job's series as a forecast's (one target variate, no covariates), an interval the
    model can give, and a point to score in each series. Returns the index of each series' first
    scored point and the forecasts the job runs (one per `horizon` scored points)."""
    check(series, params.forecast(), spec, settings)
    for i, cov in enumerate(series.covariates or ()):
        if cov:
            raise _unsupported(f"inputs[{i}].{next(iter(cov))}_covariates", "an anomaly job scores targets alone")
    if series.multivariate:
        i = int(np.flatnonzero(series.variates > 1)[0])
        raise _unsupported(f"inputs[{i}].target", "an anomaly job scores one target variate per series")
    native = spec.native_quantiles
    lower, upper = params.bounds()
    if native and (lower < min(native) - 1e-9 or upper > max(native) + 1e-9):
        widest = 1 - 2 * max(min(native), 1 - max(native))
        raise _unsupported(
            "parameters.level",
            f"{spec.id} outputs quantiles {min(native):g}-{max(native):g}: level {params.level:g} needs "
            f"{lower:g} and {upper:g}; at most {widest:.4g}",
        )
    lengths = series.lengths()
    starts = [params.first_scored(int(n), spec.context_length) for n in lengths]
    for i, (n, start) in enumerate(zip(lengths, starts, strict=True)):
        if start >= n:
            raise _invalid(
                f"inputs[{i}].target",
                f"{int(n)} points leave none to score from index {start} (score_from, or context_length)"
                if n > 1 else "needs at least 2 points: one of context, one to score",
            )  # fmt: skip
    windows = sum(-(-(int(n) - start) // params.horizon) for n, start in zip(lengths, starts, strict=True))
    if windows > settings.max_anomaly_windows:
        raise _over(
            "inputs",
            f"{windows} forecasts (one per {params.horizon} scored point(s)); at most {settings.max_anomaly_windows} "
            "per anomaly job (MAX_ANOMALY_WINDOWS)",
        )
    return starts, windows


def check_finetune(series: SeriesSet, params: FinetuneParameters, spec: ModelSpec, settings: Settings) -> None:
    """A fine-tuning job: a base model that can be tuned, training series as a forecast's (past
    covariates only), long enough for the horizon (and the held-out points), within the step limit."""
    if not families.of(spec).fine_tunable:
        raise _unsupported("model", f"{spec.id} cannot be fine-tuned here; amazon/chronos-2 can")
    check(series, ForecastParameters(prediction_length=params.prediction_length), spec, settings)
    for i, cov in enumerate(series.covariates or ()):
        if cov and cov.get("future"):
            raise _invalid(f"inputs[{i}].future_covariates", "training takes each covariate's history in "
                           "past_covariates; known future values are for forecasts")  # fmt: skip
    if params.num_steps > settings.max_finetune_steps:
        raise _over("parameters.num_steps", f"{params.num_steps} steps; at most {settings.max_finetune_steps}")
    if params.context_length is not None and params.context_length > spec.context_length:
        raise _over(
            "parameters.context_length", f"{params.context_length}; {spec.id} sees at most {spec.context_length}"
        )
    # The library trains on windows of at least `prediction_length` context points before a
    # horizon; held-out points come off the end first.
    horizon = params.prediction_length
    needed = 2 * horizon + (horizon if params.validation else 0)
    lengths = series.lengths()
    short = np.flatnonzero(lengths < needed)
    if len(short):
        i = int(short[0])
        raise _invalid(
            f"inputs[{i}].target",
            f"{int(lengths[i])} points; fine-tuning for prediction_length {horizon} needs at least {needed}"
            + (f" ({horizon} of them held out for validation)" if params.validation else ""),
        )


def _check_covariates(
    series: SeriesSet, horizon: int, spec: ModelSpec, settings: Settings, field: Callable[[int], str]
) -> None:
    """Covariates and several target variates: Chronos-2 only, and every length lined up."""
    covariates = series.covariates or [None] * len(series)
    if not families.of(spec).takes_covariates:
        for i, cov in enumerate(covariates):
            if cov:
                group = next(iter(cov))
                raise _unsupported(
                    f"{field(i)}.{group}_covariates", f"{spec.id} takes no covariates; amazon/chronos-2 does"
                )
        if series.multivariate:
            i = int(np.flatnonzero(series.variates > 1)[0])
            raise _unsupported(
                f"{field(i)}.target", f"{spec.id} forecasts one variate per series; amazon/chronos-2 takes several"
            )
        return
    lengths = series.lengths()
    for i, cov in enumerate(covariates):
        at = field(i)
        past, future = (cov or {}).get("past", {}), (cov or {}).get("future", {})
        rows = int(series.variates[i]) + len(past)
        if rows > settings.max_variates:
            raise _over(f"{at}.target", f"{rows} target variates and covariates; at most {settings.max_variates}")
        for group, values_of, length, what in (
            ("past_covariates", past, int(lengths[i]), f"the target's {int(lengths[i])} points"),
            ("future_covariates", future, horizon, f"parameters.prediction_length ({horizon})"),
        ):
            for name, values in values_of.items():
                name_field = f"{at}.{group}.{name}"
                if len(values) != length:
                    raise _invalid(name_field, f"{len(values)} values; it must match {what}")
                if isinstance(values, np.ndarray) and np.isinf(values).any():
                    raise _invalid(name_field, "holds an infinite value; use null or NaN for missing values")
                if group == "future_covariates":
                    if name not in past:
                        raise _invalid(name_field, "has no past values: name it in past_covariates too")
                    if _kind(values) != _kind(past[name]) and _kind(values) and _kind(past[name]):
                        raise _invalid(name_field, "mixes numeric and categorical values with its past_covariates")


def _kind(values) -> str | None:
    """'categorical' for strings, 'numeric' for numbers, None when every value is missing."""
    if isinstance(values, np.ndarray):
        return "numeric" if (~np.isnan(values)).any() else None
    return "categorical" if any(x is not None for x in values) else None


def _invalid(field: str, detail: str) -> Problem:
    message = f"{field}: {detail}"
    return Problem(422, "validation-error", message, field=field, errors=[{"field": field, "message": detail}])


def _unsupported(field: str, detail: str) -> Problem:
    return Problem(422, "unsupported-input", f"{field}: {detail}", field=field)


def _over(field: str, detail: str) -> Problem:
    return Problem(422, "limit-exceeded", f"{field}: {detail}", field=field)


_COLUMNAR = (b"application/vnd.apache.arrow.stream", b"application/vnd.apache.parquet")


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes` with 413.

    A declared Content-Length is checked up front (the server never delivers more than it
    declares). A chunked body is read here, up to the limit, then replayed to the app.
    """

    def __init__(self, app, max_bytes: int, max_columnar_bytes: int):
        self.app, self.json_bytes, self.columnar_bytes = app, max_bytes, max_columnar_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        # Arrow and Parquet bodies cost next to nothing to parse, so they may be larger than JSON.
        columnar = headers.get(b"content-type", b"").split(b";")[0].strip().lower() in _COLUMNAR
        limit = self.columnar_bytes if columnar else self.json_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                return await self._refuse(scope, receive, send, limit)
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(scope, receive, send, limit)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, limit: int):
        problem = Problem(413, "body-too-large", f"request body over {limit} bytes (MAX_BODY_BYTES)")
        await problem.response(scope.get("path"))(scope, receive, send)
