"""Anomaly detection: each scored point of a series against the model's forecast interval for it.

A series' points from its first scored index `start` (settled by the API, stored with the job)
are forecast from the (up to) `context_length` points before them: origins `start, start+h, …`
each forecast `h = horizon` steps, so every scored point is forecast once, 1 to h steps ahead.
The forecasts of all series go through the batcher as one job, in model-sized passes, and are
only kept here: the job's results are one element per series (shared.series.ANOMALY_ROWS):

- `lower`, `upper`: the quantiles (1-level)/2 and (1+level)/2 of the point's forecast;
- `median`: the forecast's median;
- `score`: 0 inside the interval, else the distance to it in interval widths (NaN for a missing
  actual). A point is an anomaly when its score is above 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from shared import families
from shared.catalog import ModelSpec
from shared.schemas import AnomalyParameters
from shared.series import ANOMALY_ROWS, Decoded, decode
from shared.store import JobRecord

from workers.batcher import Work

# An interval narrower than this (relative to the actual's size) counts as this wide, so a point
# just off a collapsed interval gets a large, finite score.
_MIN_WIDTH = 1e-6


def job(elements: list[bytes], record: JobRecord, spec: ModelSpec) -> tuple[Work, Callable[[Work], tuple]]:
    """The job's forecast windows as in-memory work whose results are kept (not stored: only the
    scored series are), and how its kept results become the job's results."""
    params = AnomalyParameters.model_validate(record.request["parameters"])
    targets = [decode(element).target[0] for element in elements]
    starts: list[int] = record.request["starts"]
    inputs = windows(targets, starts, params.context(spec.context_length), params.horizon)
    forecast = params.forecast()
    key = families.of(spec).group_key(forecast, record.id)
    work = Work(record.id, len(inputs), forecast, record.lane, key, inputs=inputs, keep=True, stored=False)

    def scored(work: Work) -> tuple[dict, list[bytes]]:
        lower, upper = params.bounds()
        rows = [1 + forecast.quantile_levels.index(q) for q in (lower, upper, 0.5)]  # row 0 is the mean
        return {}, [a.tobytes() for a in score(targets, starts, params.horizon, work.kept, rows)]

    return work, scored


def windows(targets: Sequence[np.ndarray], starts: Sequence[int], context: int, horizon: int) -> list[Decoded]:
    """One model input per origin, in series order: views into the targets (no copies)."""
    out = []
    for target, start in zip(targets, starts, strict=True):
        for origin in range(start, len(target), horizon):
            out.append(Decoded(target[None, max(0, origin - context) : origin]))
    return out


def score(
    targets: Sequence[np.ndarray],
    starts: Sequence[int],
    horizon: int,
    forecasts: Sequence[np.ndarray],
    rows: Sequence[int],
) -> list[np.ndarray]:
    """Per series float32 [len(ANOMALY_ROWS), scored points] from its windows' forecasts (in `windows`'
    order, each [1, rows, horizon]); `rows` are the lower, upper and median rows of a forecast."""
    out = []
    at = 0
    for target, start in zip(targets, starts, strict=True):
        n = len(target) - start
        count = -(-n // horizon)
        # Origin k forecasts points start + k*h … start + k*h + h-1: laid end to end, the forecasts
        # line up with the scored points.
        block = np.concatenate([forecasts[at + k][0][list(rows)] for k in range(count)], axis=1)[:, :n]
        at += count
        lower, upper, median = block.astype(np.float64)
        actual = target[start:].astype(np.float64)
        width = np.maximum(upper - lower, _MIN_WIDTH * np.maximum(1.0, np.abs(actual)))
        with np.errstate(invalid="ignore"):  # a missing actual (NaN) scores NaN
            outside = np.maximum(actual - upper, lower - actual)
            scores = np.where(np.isnan(actual), np.nan, np.maximum(outside, 0.0) / width)
        rows_of = {"lower": lower, "upper": upper, "median": median, "score": scores}
        out.append(np.stack([rows_of[name] for name in ANOMALY_ROWS]).astype(np.float32))  # the layout render reads
    return out
