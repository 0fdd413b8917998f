"""`chronos-queue`: forecasts from files, and operator commands.

chronos-queue forecast INPUT.csv|json --model amazon/chronos-bolt-small --horizon 24 [--out f.csv] [--plot f.png]
chronos-queue backtest INPUT.csv|json --model amazon/chronos-bolt-small --horizon 20 --first 252 [--out f.csv]
chronos-queue anomalies INPUT.csv|json --model amazon/chronos-bolt-small --level 0.8 [--out f.csv] [--plot f.png]
chronos-queue weights synthetic --model amazon/chronos-bolt-tiny --out DIR [--seed N]
chronos-queue weights resolve --model amazon/chronos-bolt-tiny
chronos-queue worker   (same as `python -m workers`; CHRONOS_MODEL picks the model)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared import catalog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chronos-queue", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    weights = commands.add_parser("weights", help="checkpoints a worker serves").add_subparsers(
        dest="action", required=True
    )
    build = weights.add_parser("synthetic", help="write a synthetic checkpoint (random weights, real architecture)")
    build.add_argument("--model", required=True, help="catalog id or slug")
    build.add_argument("--out", required=True, help="directory to write the checkpoint to")
    build.add_argument("--seed", type=int, default=0)
    where = weights.add_parser("resolve", help="print where a worker would load its weights from")
    where.add_argument("--model", required=True)

    commands.add_parser("worker", help="start a worker for CHRONOS_MODEL (extra args go to Celery)")

    fc = commands.add_parser("forecast", help="forecast the series of a CSV or JSON file through the service")
    fc.add_argument("input", type=Path, help="CSV or Parquet (long or wide) or JSON; see `cli/forecast.py`")
    fc.add_argument("--model", required=True, help="catalog id or slug")
    fc.add_argument("--horizon", type=int, required=True, help="steps to forecast")
    fc.add_argument("--quantiles", default="0.1,0.5,0.9", help="comma-separated levels (default 0.1,0.5,0.9)")
    fc.add_argument("--num-samples", type=int, help="sample paths (T5 models)")
    fc.add_argument("--out", type=Path, help="output file (default: stdout)")
    fc.add_argument(
        "--format", choices=("csv", "json", "parquet"), help="output format (default: from --out, else csv)"
    )
    fc.add_argument("--plot", type=Path, help="PNG of history, median and 10-90%% band (first 12 series)")
    fc.add_argument("--freq", help="pandas frequency of the series (default: inferred from timestamps)")
    fc.add_argument("--series-per-job", type=int, default=256)
    _service_options(fc)

    bt = commands.add_parser("backtest", help="backtest one series of a CSV or JSON file as one job, with scores")
    bt.add_argument("input", type=Path, help="as for `forecast`; the first series, or the one named by --item")
    bt.add_argument("--item", help="which series of the file")
    bt.add_argument("--model", required=True, help="catalog id or slug")
    bt.add_argument("--horizon", type=int, required=True, help="steps forecast from each origin")
    bt.add_argument("--first", type=int, required=True, help="first origin: points known at the first forecast")
    bt.add_argument("--last", type=int, help="last origin (default: the series' length)")
    bt.add_argument("--step", type=int, default=1)
    bt.add_argument("--context", type=int, help="points before each origin given to the model")
    bt.add_argument("--season", type=int, default=1, help="season of the naive forecast that scales MASE")
    bt.add_argument("--quantiles", default="0.1,0.5,0.9", help="comma-separated levels (the median is always added)")
    bt.add_argument("--out", type=Path, help="per-origin forecasts as CSV (one row per origin and step)")
    _service_options(bt)

    an = commands.add_parser("anomalies", help="flag the points of the series of a file that fall outside "
                             "the model's forecast interval, as one job")  # fmt: skip
    an.add_argument("input", type=Path, help="as for `forecast`")
    an.add_argument("--model", required=True, help="catalog id or slug")
    an.add_argument("--level", type=float, default=0.8, help="central interval width (default 0.8; Bolt at most 0.8)")
    an.add_argument("--context", type=int, help="points before each scored point given to the model")
    an.add_argument("--score-from", type=int, help="index of the first point scored (default: after --context)")
    an.add_argument("--horizon", type=int, default=1, help="steps forecast from each origin (default 1)")
    an.add_argument("--num-samples", type=int, help="sample paths (T5 models)")
    an.add_argument("--out", type=Path, help="one row per scored point as CSV (default: stdout)")
    an.add_argument("--plot", type=Path, help="PNG of each series (first 12) with its interval and flagged points")
    _service_options(an)

    args, rest = parser.parse_known_args(argv)
    if args.command in ("forecast", "backtest", "anomalies"):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return {"forecast": _forecast, "backtest": _backtest, "anomalies": _anomalies}[args.command](args)
    if args.command == "worker":
        from workers.__main__ import main as worker_main

        worker_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        spec = catalog.get(args.model)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    if args.action == "synthetic":
        from workers import synthetic

        path = synthetic.build(spec, args.out, seed=args.seed)
        print(f"synthetic checkpoint of {spec.id} (seed {args.seed}) in {path}: forecasts from it are meaningless")
        return 0
    from shared.settings import get_settings

    from workers.weights import WeightsNotFound, resolve

    try:
        found = resolve(spec, get_settings())
    except WeightsNotFound as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{spec.id}: {found.kind} weights from {found.source}: {found.path}")
    return 0


def _forecast(args: argparse.Namespace) -> int:
    from cli import forecast
    from client import ChronosQueueError, Client

    try:
        quantiles = [float(q) for q in args.quantiles.split(",") if q.strip()]
    except ValueError as exc:
        print(f"error: --quantiles: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        quantiles = sorted({*quantiles, *forecast.PLOT_QUANTILES})
    series = _series(args)
    if not series:
        return 2
    try:
        with Client(args.url, api_key=args.api_key) as client:
            predictions, weights = forecast.run(
                client, series, args.model, args.horizon, quantiles, args.series_per_job,
                progress=not args.no_progress, num_samples=args.num_samples,
            )  # fmt: skip
    except (ChronosQueueError, RuntimeError, OSError) as exc:
        return _failed(exc)
    if "synthetic" in weights:
        print(
            f"warning: {args.model} answered with SYNTHETIC weights: these forecasts are meaningless", file=sys.stderr
        )
    suffix = args.out.suffix.lower().lstrip(".") if args.out else ""
    fmt = args.format or (suffix if suffix in ("json", "parquet") else "csv")
    forecast.write(forecast.rows(series, predictions, args.horizon, args.freq), args.out, fmt)
    if args.plot:
        title = args.model + (" - SYNTHETIC weights: meaningless forecasts" if "synthetic" in weights else "")
        drawn = forecast.plot(series, predictions, args.horizon, args.plot, title)
        print(f"plot of {drawn} of {len(series)} series: {args.plot}", file=sys.stderr)
    return 0


def _backtest(args: argparse.Namespace) -> int:
    from cli import forecast
    from client import ChronosQueueError, Client

    try:
        found = forecast.read(args.input, args.id_column, args.time_column, args.value_column)
        chosen = [s for s in found if args.item is None or s.item_id == args.item]
        if not chosen:
            raise ValueError(f"no series {args.item!r}" if args.item else "no series")
        series = chosen[0]
        quantiles = [float(q) for q in args.quantiles.split(",") if q.strip()]
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read {args.input}: {exc}", file=sys.stderr)
        return 2
    try:
        with Client(args.url, api_key=args.api_key) as client:
            job = forecast.backtest(
                client, series, args.model, args.first, args.last or len(series.values), args.horizon,
                step=args.step, context_length=args.context, quantile_levels=quantiles, season_length=args.season,
                progress=not args.no_progress,
            )  # fmt: skip
    except (ChronosQueueError, RuntimeError, OSError) as exc:
        return _failed(exc)
    if job.weights == "synthetic":
        print(f"warning: {args.model} answered with SYNTHETIC weights: these scores are meaningless", file=sys.stderr)
    if args.out:
        forecast.write(forecast.backtest_rows(series, job.backtest["forecasts"], args.horizon), args.out, "csv")
    print(json.dumps({"job": job.id, "item_id": series.item_id, "model": job.model, **job.backtest["metrics"]}))
    return 0


def _anomalies(args: argparse.Namespace) -> int:
    from cli import anomalies, forecast
    from client import ChronosQueueError, Client

    series = _series(args)
    if not series:
        return 2
    try:
        with Client(args.url, api_key=args.api_key) as client:
            job = anomalies.run(
                client, series, args.model, progress=not args.no_progress, level=args.level,
                context_length=args.context, score_from=args.score_from, horizon=args.horizon,
                num_samples=args.num_samples,
            )  # fmt: skip
    except (ChronosQueueError, RuntimeError, OSError) as exc:
        return _failed(exc)
    synthetic = job.weights == "synthetic"
    if synthetic:
        print(f"warning: {args.model} answered with SYNTHETIC weights: these flags are meaningless", file=sys.stderr)
    forecast.write(anomalies.rows(series, job.anomalies), args.out, "csv")
    flagged = sum(sum(found["anomaly"]) for found in job.anomalies)
    print(f"{flagged} anomalies in {len(series)} series (job {job.id})", file=sys.stderr)
    if args.plot:
        title = f"{args.model}, level {args.level:g}" + (" - SYNTHETIC weights: meaningless" if synthetic else "")
        drawn = anomalies.plot(series, job.anomalies, args.plot, title)
        print(f"plot of {drawn} of {len(series)} series: {args.plot}", file=sys.stderr)
    return 0


def _series(args: argparse.Namespace) -> list:
    """The series of the input file; none (said why on stderr) when it cannot be read or holds none."""
    from cli import forecast

    try:
        series = forecast.read(args.input, args.id_column, args.time_column, args.value_column)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read {args.input}: {exc}", file=sys.stderr)
        return []
    if not series:
        print(f"error: no series in {args.input}", file=sys.stderr)
    return series


def _service_options(command: argparse.ArgumentParser) -> None:
    """What every command that sends a file's series to the service takes: where the service is, and
    how to read the file."""
    command.add_argument("--url", default=os.environ.get("CHRONOS_QUEUE_URL", "http://127.0.0.1:8000"))
    command.add_argument("--api-key", default=os.environ.get("CHRONOS_QUEUE_API_KEY"), help="or CHRONOS_QUEUE_API_KEY")
    command.add_argument("--id-column", default="item_id")
    command.add_argument("--time-column", default="timestamp")
    command.add_argument("--value-column", default="target")
    command.add_argument("--no-progress", action="store_true")


def _failed(exc: Exception) -> int:
    """Say why a command failed (a problem answer with its code and field); exit status 1."""
    from client import ChronosQueueError

    if isinstance(exc, ChronosQueueError):
        where = f" ({exc.field})" if exc.field else ""
        print(f"error: {exc.status} {exc.code}{where}: {exc.detail}", file=sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
