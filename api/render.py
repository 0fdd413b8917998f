"""A job's answer, rendered at the edge from the float32 arrays the worker stored.

Results stay arrays until the last moment: the job's metadata is the `JobView` (one spelling
of the answer's shape), and predictions are spliced in as numpy arrays that orjson writes in C
(JSON), or laid out as one long-format table (Arrow IPC stream or Parquet, when `Accept`
asks for it). Values are widened to float64 first, so the JSON numbers are the float32 results
exactly and a client reading them back gets what the model computed, bit for bit.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from shared.schemas import JobView
from shared.series import ANOMALY_ROWS, ResultLayout
from shared.store import JobKind, JobRecord

ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def layout(record: JobRecord, first: bytes | None) -> ResultLayout:
    """How the job's output elements are laid out (see `shared.series.ResultLayout`)."""
    params = record.request.get("parameters", {})
    levels = tuple(params.get("quantile_levels") or ())
    if record.kind is JobKind.BACKTEST:
        levels = tuple(sorted({*levels, 0.5}))
    horizon = params.get("prediction_length") or record.prediction_length
    samples = 0
    if params.get("return_samples") and first is not None:
        samples = len(first) // 4 // horizon - 1 - len(levels)
    return ResultLayout(levels, horizon, samples)


def predictions(record: JobRecord, outputs: list[bytes], items: list | None) -> list[dict]:
    """One entry per series: item_id, mean, one key per level (samples when asked), start if given."""
    shape = layout(record, outputs[0] if outputs else None)
    out = []
    for i, raw in enumerate(outputs):
        item_id, start, nested = items[i] if items else (None, None, False)
        forecast = {"item_id": item_id, **shape.forecast(raw, univariate=not nested)}
        if start is not None:
            forecast["start"] = start
        out.append(forecast)
    return out


def backtest(record: JobRecord, outputs: list[bytes]) -> dict:
    """A backtest's scores and its per-origin forecasts (origin, and one key per level)."""
    shape = layout(record, outputs[0] if outputs else None)
    origins = record.request["origins"]
    values = range(origins["first"], origins["last"] + 1, origins.get("step", 1))
    forecasts = []
    for origin, raw in zip(values, outputs, strict=False):
        block = shape.forecast(raw)
        forecasts.append({"origin": origin, **{str(q): block[str(q)] for q in shape.levels}})
    return {**(record.backtest or {}), "forecasts": forecasts}


def _scored(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, np.float32).reshape(len(ANOMALY_ROWS), -1).astype(np.float64)


def anomalies(record: JobRecord, outputs: list[bytes], items: list | None) -> list[dict]:
    """One entry per series: item_id, the index of its first scored point, and per scored point the
    interval, the median, the flag and the score (NaN, written as null, where the actual is missing)."""
    starts = record.request.get("starts") or [0] * len(outputs)
    out = []
    for i, raw in enumerate(outputs):
        rows = dict(zip(ANOMALY_ROWS, _scored(raw), strict=True))
        out.append({
            "item_id": items[i][0] if items else None, "start": starts[i],
            "lower": rows["lower"], "upper": rows["upper"], "median": rows["median"],
            "anomaly": rows["score"] > 0, "score": rows["score"],
        })  # fmt: skip
    return out


def attach(record: JobRecord, outputs: list[bytes], items: list | None) -> JobRecord:
    """Fill the record's `predictions` (or `backtest` forecasts, or `anomalies`) as plain lists."""
    if record.kind is JobKind.BACKTEST:
        record.backtest = _lists(backtest(record, outputs))
    elif record.kind is JobKind.ANOMALY:
        record.anomalies = _lists(anomalies(record, outputs, items))
    else:
        record.predictions = _lists(predictions(record, outputs, items))
    return record


def job_json(record: JobRecord, outputs: list[bytes] | None = None, items: list | None = None) -> bytes:
    """The job as `JobView` JSON, its results spliced in as arrays (written by orjson in C)."""
    view = _metadata(record)
    view["members"] = record.members  # an ensemble's, with their predictions as arrays
    if outputs is not None:
        if record.kind is JobKind.BACKTEST:
            view["backtest"] = backtest(record, outputs)
        elif record.kind is JobKind.ANOMALY:
            view["anomalies"] = anomalies(record, outputs, items)
        else:
            view["predictions"] = predictions(record, outputs, items)
    return orjson.dumps(view, option=_OPTIONS)


def job_metadata(record: JobRecord) -> bytes:
    """The job without predictions or backtest, and with its owner: what an `admin` key is shown of
    another owner's job (its series were never in the record, so nothing of them is either)."""
    return orjson.dumps({**_metadata(record), "owner": record.owner})


def _metadata(record: JobRecord) -> dict:
    """The job's view without its results (the forecasts, scores or flags, all derived from series values)."""
    view = JobView.of(record).model_dump(mode="json", exclude={"anomalies", "members", "predictions", "backtest"})
    view["anomalies"] = view["members"] = view["predictions"] = view["backtest"] = None
    return view


# Series per piece of a streamed answer.
PIECE = 1000


def job_json_chunks(record: JobRecord, outputs: list[bytes], items: list | None) -> Iterator[bytes]:
    """`job_json` of a forecast with many series, in pieces of `PIECE` series: a streamed answer is
    rendered on a worker thread piece by piece, so no single call holds the event loop (or the GIL)
    for the whole answer."""
    head = job_json(record)
    tail = b'"predictions":null,"backtest":null}'
    if not head.endswith(tail):  # the view's last two fields, as JobView orders them
        raise RuntimeError("JobView no longer ends with predictions and backtest")
    yield head[: -len(tail)] + b'"predictions":['
    for start in range(0, len(outputs), PIECE):
        piece = predictions(record, outputs[start : start + PIECE], items[start : start + PIECE] if items else None)
        yield (b"," if start else b"") + orjson.dumps(piece, option=_OPTIONS)[1:-1]
    yield b'],"backtest":null}'


def table(record: JobRecord, outputs: list[bytes], items: list | None):
    """Long format, one row per series (and variate) and step: item_id, [variate,] step, mean, a column per level."""
    if record.kind is JobKind.ANOMALY:
        return _anomaly_table(record, outputs, items)

    shape = layout(record, outputs[0] if outputs else None)
    blocks = [shape.array(raw) for raw in outputs]  # [variates, rows, horizon] each
    variates = np.array([b.shape[0] for b in blocks], dtype=np.int64)
    stacked = np.concatenate(blocks) if blocks else np.zeros((0, shape.rows, shape.horizon), np.float32)
    n_rows = stacked.shape[0]
    h = shape.horizon
    ids = [item[0] for item in items] if items else [None] * len(outputs)
    columns: dict = {"item_id": pa.array(np.repeat(np.array(ids, dtype=object), variates * h), type=pa.string())}
    if variates.max(initial=1) > 1:
        columns["variate"] = np.concatenate([np.repeat(np.arange(v), h) for v in variates])
    columns["step"] = np.tile(np.arange(1, h + 1, dtype=np.int32), n_rows)
    columns["mean"] = stacked[:, 0].reshape(-1)
    for j, level in enumerate(shape.levels):
        columns[str(level)] = stacked[:, 1 + j].reshape(-1)
    return pa.table(columns)


def _anomaly_table(record: JobRecord, outputs: list[bytes], items: list | None):
    """An anomaly job's results in long format, one row per scored point: item_id, index (in its
    series), lower, upper, median, anomaly, score."""
    blocks = [_scored(raw) for raw in outputs]
    counts = np.array([b.shape[1] for b in blocks], dtype=np.int64)
    starts = np.array(record.request.get("starts") or [0] * len(outputs), dtype=np.int64)
    ids = [item[0] for item in items] if items else [None] * len(outputs)
    stacked = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(ANOMALY_ROWS), 0))
    first = np.repeat(np.cumsum(counts) - counts, counts)
    columns: dict = {
        "item_id": pa.array(np.repeat(np.array(ids, dtype=object), counts), type=pa.string()),
        "index": np.repeat(starts, counts) + np.arange(int(counts.sum())) - first,
    }
    rows = dict(zip(ANOMALY_ROWS, stacked, strict=True))
    columns |= {"lower": rows["lower"], "upper": rows["upper"], "median": rows["median"]}
    columns |= {"anomaly": rows["score"] > 0, "score": rows["score"]}
    return pa.table(columns)


def columnar(record: JobRecord, outputs: list[bytes], items: list | None, media_type: str) -> bytes:
    """The results table as an Arrow IPC stream or a Parquet file."""

    result = table(record, outputs, items)
    sink = io.BytesIO()
    if media_type == PARQUET:
        pq.write_table(result, sink)
    else:
        with pa.ipc.new_stream(sink, result.schema) as writer:
            writer.write_table(result)
    return sink.getvalue()


def wanted(accept: str | None) -> str | None:
    """The columnar media type an `Accept` header asks for, if any (JSON otherwise)."""
    accept = (accept or "").lower()
    for media_type in (ARROW, PARQUET):
        if media_type in accept:
            return media_type
    return None


def _lists(value):
    """Arrays inside plain containers as lists (for pydantic models built from them)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lists(v) for v in value]
    return value
