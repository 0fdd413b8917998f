"""`chronos-queue forecast`: series from a CSV or JSON file in, forecasts (and a plot) out.

Inputs it reads:
- CSV, long format: one row per observation with an id column (`--id-column`, default `item_id`),
  a value column (`--value-column`, default `target`) and optionally a time column.
- CSV, wide format: no id column; an optional time column (`--time-column`, default `timestamp`,
  else the first column when it parses as dates) and one numeric column per series.
- JSON: the native body (`{"inputs": [{"target", "item_id"?, "start"?}]}`), a list of such
  inputs, or an object mapping names to value lists.

Series go out in jobs of `--series-per-job`, all queued at once; a progress bar counts the series
done. Forecasts are written one row per series and step, with future timestamps when a frequency
is known (`--freq`, or inferred from the timestamps).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from client import Client

PLOT_QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class Series:
    item_id: str
    values: list[float | None]
    timestamps: pd.DatetimeIndex | None = None

    def future(self, horizon: int, freq: str | None) -> list[str] | None:
        """Timestamps of the forecast steps, when the series has timestamps and a frequency is known."""
        if self.timestamps is None or len(self.timestamps) == 0:
            return None
        freq = freq or (pd.infer_freq(self.timestamps) if len(self.timestamps) >= 3 else None)
        if freq is None:
            return None
        steps = pd.date_range(self.timestamps[-1], periods=horizon + 1, freq=freq)[1:]
        return [t.isoformat() for t in steps]


def _values(column: pd.Series) -> list[float | None]:
    return [None if pd.isna(v) else float(v) for v in pd.to_numeric(column, errors="raise")]


def read(path: Path, id_column: str, time_column: str, value_column: str) -> list[Series]:
    if path.suffix.lower() == ".json":
        return _read_json(json.loads(path.read_text()))
    frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    if id_column in frame.columns:
        if value_column not in frame.columns:
            raise ValueError(f"{path}: long format needs a {value_column!r} column (--value-column)")
        found = []
        for item_id, group in frame.groupby(id_column, sort=False):
            stamps = None
            if time_column in group.columns:
                group = group.assign(**{time_column: pd.to_datetime(group[time_column])}).sort_values(time_column)
                stamps = pd.DatetimeIndex(group[time_column])
            found.append(Series(str(item_id), _values(group[value_column]), stamps))
        return found
    stamps = None
    time_col = time_column if time_column in frame.columns else frame.columns[0]
    # The first column counts as time only when it holds text that parses as dates (numbers never do).
    if time_col == time_column or not pd.api.types.is_numeric_dtype(frame[time_col]):
        try:
            stamps = pd.DatetimeIndex(pd.to_datetime(frame[time_col]))
            frame = frame.drop(columns=[time_col])
        except (ValueError, TypeError):
            if time_col == time_column:
                raise
    return [Series(str(name), _values(frame[name]), stamps) for name in frame.columns]


def _read_json(data) -> list[Series]:
    if isinstance(data, dict) and "inputs" in data:
        data = data["inputs"]
    if isinstance(data, dict):
        return [Series(str(name), list(values)) for name, values in data.items()]
    found = []
    for i, item in enumerate(data):
        stamps = None
        if item.get("start") and item.get("freq"):
            stamps = pd.date_range(item["start"], periods=len(item["target"]), freq=item["freq"])
        found.append(Series(str(item.get("item_id", i)), list(item["target"]), stamps))
    return found


def run(
    client: Client,
    series: list[Series],
    model: str,
    horizon: int,
    quantiles: list[float],
    per_job: int,
    progress: bool = True,
    **parameters,
) -> tuple[list[dict], set[str]]:
    """Forecast every series through the queue: one prediction dict per series, in input order, and
    the kinds of weights that answered ('real', 'synthetic')."""
    from tqdm import tqdm

    jobs = [
        client.submit(
            model,
            [{"target": s.values, "item_id": s.item_id} for s in series[i : i + per_job]],
            horizon,
            quantile_levels=quantiles,
            **parameters,
        )
        for i in range(0, len(series), per_job)
    ]
    predictions: list[dict] = []
    weights: set[str] = set()
    with tqdm(total=len(series), unit="series", disable=not progress, file=sys.stderr) as bar:
        for job in jobs:
            done = client.wait(job.id)
            if done.status.value != "succeeded":
                raise RuntimeError(f"job {done.id} {done.status.value}: {done.error or ''}".strip())
            if done.predictions is None:
                raise RuntimeError(f"job {done.id} succeeded without predictions")
            predictions += done.predictions
            weights.add(done.weights or "unknown")
            bar.update(done.n_series)
    return predictions, weights


def backtest(
    client: Client, series: Series, model: str, first: int, last: int, horizon: int, *, progress: bool, **options
):
    """Run one backtest job, with a progress bar of the origins done; returns the finished job."""
    job = client.submit_backtest(model, {"item_id": series.item_id, "target": series.values}, first, last, horizon,
                                 **options)  # fmt: skip
    return follow(client, job, "origin", progress)


def follow(client: Client, job, unit: str, progress: bool):
    """Poll a job to its end with a progress bar (`unit`s done of its total); the succeeded job,
    else RuntimeError naming how it ended."""
    import time

    from tqdm import tqdm

    total = job.progress.total if job.progress else None
    with tqdm(total=total, unit=unit, disable=not progress, file=sys.stderr) as bar:
        while job.status.value in ("queued", "running"):
            time.sleep(0.5)
            job = client.get(job.id)
            if job.progress:
                bar.update(job.progress.done - bar.n)
    if job.status.value != "succeeded":
        raise RuntimeError(f"{job.kind.value} job {job.id} {job.status.value}: {job.error or ''}".strip())
    return job


def backtest_rows(series: Series, forecasts: list[dict], horizon: int) -> list[dict]:
    """One row per origin and step: origin, step, the actual when the series holds it, the quantiles."""
    out = []
    for forecast in forecasts:
        origin = forecast["origin"]
        levels = [k for k in forecast if k != "origin"]
        for step in range(horizon):
            at = origin + step
            actual = series.values[at] if at < len(series.values) else None
            row = {"origin": origin, "step": step + 1, "actual": actual}
            if series.timestamps is not None and at < len(series.timestamps):
                row["timestamp"] = series.timestamps[at].isoformat()
            row.update({level: forecast[level][step] for level in levels})
            out.append(row)
    return out


def rows(series: list[Series], predictions: list[dict], horizon: int, freq: str | None) -> list[dict]:
    """One row per series and step: item_id, step, timestamp (when known), mean, quantiles."""
    out = []
    for s, forecast in zip(series, predictions, strict=True):
        stamps = s.future(horizon, freq)
        levels = [k for k in forecast if k not in ("mean", "item_id", "start", "samples")]
        for step in range(horizon):
            row = {"item_id": s.item_id, "step": step + 1}
            if stamps:
                row["timestamp"] = stamps[step]
            row["mean"] = forecast["mean"][step]
            row.update({level: forecast[level][step] for level in levels})
            out.append(row)
    return out


def write(out_rows: list[dict], path: Path | None, fmt: str) -> None:
    if fmt == "parquet":
        if path is None:
            raise ValueError("Parquet output needs --out FILE")
        pd.DataFrame(out_rows).to_parquet(path, index=False)
        return
    stream = path.open("w", newline="") if path else sys.stdout
    try:
        if fmt == "json":
            json.dump(out_rows, stream, indent=1)
            stream.write("\n")
        else:
            fields = list(dict.fromkeys(k for row in out_rows for k in row))
            writer = csv.DictWriter(stream, fieldnames=fields)
            writer.writeheader()
            writer.writerows(out_rows)
    finally:
        if path:
            stream.close()


def plot(
    series: list[Series], predictions: list[dict], horizon: int, path: Path, title: str, max_series: int = 12
) -> int:
    """History, median and the 10-90% band of up to `max_series` series; returns how many were drawn."""
    shown = list(zip(series, predictions, strict=True))[:max_series]
    fig, axes = figure(len(shown), columns=3, width=5)
    for ax, (s, forecast) in zip(axes, shown, strict=False):
        history = s.values[-max(4 * horizon, 64) :]
        t0 = len(history)
        ax.plot(range(t0), [float("nan") if v is None else v for v in history], color="black", lw=1, label="history")
        steps = range(t0, t0 + horizon)
        ax.fill_between(steps, forecast["0.1"], forecast["0.9"], alpha=0.3, color="tab:blue", label="10-90%")
        ax.plot(steps, forecast["0.5"], color="tab:blue", lw=1.5, label="median")
        ax.set_title(s.item_id, fontsize=9)
    save(fig, axes, len(shown), title, path)
    return len(shown)


def figure(n: int, columns: int, width: float):
    """A figure of `n` panels in rows of `columns` (each `width` x 3 inches), and its axes in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3 * rows), squeeze=False)
    return fig, list(axes.flat)


def save(fig, axes: list, used: int, title: str, path: Path) -> None:
    """Blank the unused panels, add the legend and title, write the PNG."""
    import matplotlib.pyplot as plt

    for ax in axes[used:]:
        ax.axis("off")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
