"""Backtests: one series, a forecast from each origin, scored against the actuals the series holds.

An origin `o` is the number of points known when forecasting: the model sees the (up to)
`context_length` points before `o` and forecasts points `o … o+h-1`. All the origins' windows
go through the batcher as one job, so they share model-sized forward passes.

Scores, over every forecast step that has an actual (a non-missing value inside the series):
- MASE: mean absolute error of the median, divided by the mean absolute error of the seasonal
  naive forecast (`y[t] - y[t-m]`) over the history before the first origin.
- WQL: weighted quantile loss over the requested levels, `sum_q sum_t 2·pinball_q / (|Q| · sum_t |y|)`.
- Coverage: for each pair of levels `q` and `1-q` (q < 0.5), the share of actuals inside that
  interval, keyed by its nominal width (`0.8` for 0.1/0.9).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from shared import families
from shared.catalog import ModelSpec
from shared.schemas import BacktestRequest
from shared.series import Decoded, decode
from shared.store import JobRecord

from workers.batcher import Work


def job(elements: list[bytes], record: JobRecord, spec: ModelSpec) -> tuple[Work, Callable[[Work], tuple]]:
    """A backtest's windows, cut from its one stored series, as in-memory work whose results are
    kept (and stored: they are the per-origin forecasts), and how its kept results are scored."""
    stored = decode(elements[0])
    series: dict = {"target": _as_list(stored.target[0])}
    if stored.past:
        series["past_covariates"] = {name: _as_list(values) for name, values in stored.past.items()}
    options = {k: v for k, v in record.request.items() if k != "finetuned"}  # the model is the worker's business
    request = BacktestRequest.model_validate({"model": spec.id, "series": series, **options})
    params = request.parameters.model_copy(update={"quantile_levels": levels(request)})
    windows_ = [
        Decoded.of(w["target"], w.get("past_covariates"), w.get("future_covariates"))
        for w in windows(request, spec.context_length)
    ]
    key = families.of(spec).group_key(params, record.id)
    work = Work(record.id, len(windows_), params, record.lane, key, inputs=windows_, keep=True)

    def scored(work: Work) -> tuple[dict, None]:
        forecasts = [{str(q): block[0, 1 + j] for j, q in enumerate(params.quantile_levels)} for block in work.kept]
        return {"backtest": {"metrics": score(request, forecasts)["metrics"]}}, None

    return work, scored


def _as_list(values: np.ndarray) -> list:
    if values.dtype == object:
        return values.tolist()
    return [None if np.isnan(x) else float(x) for x in values.tolist()]


def levels(request: BacktestRequest) -> list[float]:
    """Quantile levels a backtest computes: the requested ones plus the median."""
    return sorted({*request.parameters.quantile_levels, 0.5})


def windows(request: BacktestRequest, context_length: int) -> list[dict]:
    """One model input per origin, as a request series (`target`, and Chronos-2 covariates)."""
    series = request.series
    context = min(request.context_length or context_length, context_length)
    horizon = request.parameters.prediction_length
    past = series.past_covariates or {}
    known = set(request.known_covariates)
    out = []
    for origin in request.origins.values():
        lo = max(0, origin - context)
        window: dict = {"target": series.target[lo:origin]}
        if past:
            window["past_covariates"] = {name: values[lo:origin] for name, values in past.items()}
            future = {
                name: [*values[origin : origin + horizon], *[None] * max(0, origin + horizon - len(values))]
                for name, values in past.items()
                if name in known
            }
            if future:
                window["future_covariates"] = future
        out.append(window)
    return out


def score(request: BacktestRequest, forecasts: Sequence[dict]) -> dict:
    """The per-origin forecasts (with their origin) and the scores against the series' actuals."""
    target = np.array([math.nan if x is None else x for x in request.series.target], dtype=np.float64)
    horizon = request.parameters.prediction_length
    quantile_levels = levels(request)
    errors, losses, actual_sum = [], dict.fromkeys(request.parameters.quantile_levels, 0.0), 0.0
    pairs = [q for q in request.parameters.quantile_levels if q < 0.5 and round(1 - q, 10) in _rounded(quantile_levels)]
    inside = {q: [0, 0] for q in pairs}  # actuals inside [q, 1-q], actuals scored
    out = []
    for origin, forecast in zip(request.origins.values(), forecasts, strict=True):
        out.append({"origin": origin, **{str(q): forecast[str(q)] for q in quantile_levels}})
        actual = target[origin : origin + horizon]
        seen = ~np.isnan(actual)
        if not seen.any():
            continue
        y = actual[seen]
        step = {q: np.asarray(forecast[str(q)][: len(actual)], dtype=np.float64)[seen] for q in quantile_levels}
        errors.append(np.abs(y - step[0.5]))
        actual_sum += float(np.abs(y).sum())
        for q in losses:
            diff = y - step[q]
            losses[q] += float(np.sum(np.maximum(q * diff, (q - 1) * diff)))
        for q, counts in inside.items():
            upper = step[_match(quantile_levels, 1 - q)]
            counts[0] += int(np.sum((y >= step[q]) & (y <= upper)))
            counts[1] += len(y)
    abs_errors = np.concatenate(errors) if errors else np.array([])
    first = request.origins.first
    naive = _naive_mae(target[:first], request.season_length)
    mae = float(abs_errors.mean()) if len(abs_errors) else None
    metrics = {
        "mase": _finite(mae / naive) if mae is not None and naive else None,
        "wql": _finite(2 * sum(losses.values()) / (len(losses) * actual_sum)) if actual_sum else None,
        "coverage": {f"{1 - 2 * q:.4g}": counts[0] / counts[1] for q, counts in inside.items() if counts[1]},
        "mae": _finite(mae),
        "points_scored": len(abs_errors),
        "origins_scored": len(errors),
    }
    return {"metrics": metrics, "forecasts": out}


def _naive_mae(history: np.ndarray, season: int) -> float | None:
    """Mean absolute error of the seasonal naive forecast over `history` (pairs with both values)."""
    if len(history) <= season:
        return None
    diffs = np.abs(history[season:] - history[:-season])
    diffs = diffs[~np.isnan(diffs)]
    return float(diffs.mean()) if len(diffs) else None


def _rounded(values: Sequence[float]) -> set[float]:
    return {round(v, 10) for v in values}


def _match(values: Sequence[float], wanted: float) -> float:
    return next(v for v in values if round(v, 10) == round(wanted, 10))


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
