"""`chronos-queue anomalies`: the series of a file scored as one anomaly job; flagged points out as
CSV (one row per scored point), and with `--plot`, a PNG of each series with the model's interval
and the flagged points marked. Reads the files `chronos-queue forecast` reads (cli/forecast.py)."""

from __future__ import annotations

from pathlib import Path

from cli.forecast import Series, figure, follow, save
from client import Client


def run(client: Client, series: list[Series], model: str, *, progress: bool, **parameters):
    """Submit the series as one anomaly job and follow it with a progress bar of the forecasts
    done; returns the finished job."""
    job = client.submit_anomalies(model, [{"target": s.values, "item_id": s.item_id} for s in series], **parameters)
    return follow(client, job, "forecast", progress)


def rows(series: list[Series], anomalies: list[dict]) -> list[dict]:
    """One row per scored point: item_id, index, timestamp (when known), actual, interval, median, flag, score."""
    out = []
    for s, found in zip(series, anomalies, strict=True):
        for i in range(len(found["score"])):
            at = found["start"] + i
            row: dict = {"item_id": s.item_id, "index": at}
            if s.timestamps is not None:
                row["timestamp"] = s.timestamps[at].isoformat()
            row["actual"] = s.values[at]
            row.update({key: found[key][i] for key in ("lower", "upper", "median", "anomaly", "score")})
            out.append(row)
    return out


def plot(series: list[Series], anomalies: list[dict], path: Path, title: str, max_series: int = 12) -> int:
    """Each series (up to `max_series`) with the interval and median over its scored points and its
    flagged points marked in red; returns how many were drawn."""
    shown = list(zip(series, anomalies, strict=True))[:max_series]
    fig, axes = figure(len(shown), columns=2, width=7)
    for ax, (s, found) in zip(axes, shown, strict=False):
        values = [float("nan") if v is None else v for v in s.values]
        ax.plot(range(len(values)), values, color="black", lw=1, label="series")
        scored = range(found["start"], found["start"] + len(found["score"]))
        ax.fill_between(scored, found["lower"], found["upper"], alpha=0.3, color="tab:blue", label="interval")
        ax.plot(scored, found["median"], color="tab:blue", lw=1, label="median")
        flagged = [t for t, flag in zip(scored, found["anomaly"], strict=True) if flag]
        ax.scatter(flagged, [values[t] for t in flagged], color="red", s=18, zorder=3, label="anomaly")
        ax.set_title(f"{s.item_id}: {len(flagged)} of {len(scored)} points flagged", fontsize=9)
    save(fig, axes, len(shown), title, path)
    return len(shown)
