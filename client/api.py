"""The Python client: `Client` (blocking) and `AsyncClient` (asyncio), the same methods on both.

    from client import Client
    with Client("http://127.0.0.1:8000", api_key="...") as cq:
        job = cq.predict("amazon/chronos-bolt-tiny", [[1.0, 2.0, 3.0, 2.0, 1.0]], prediction_length=4)
        job.predictions[0]["0.5"]

Answers 429 and 503 are retried, waiting as long as the server's `Retry-After` says (else
backing off), up to `max_retries` times; every other error is raised as a typed
`ChronosQueueError` carrying the problem+json details. The request building and answer
reading are shared by both classes; only the sending differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypedDict

import httpx

from shared.schemas import JobView, ModelView
from shared.store import TERMINAL

from client.errors import WaitTimeout, error_for

Series = Sequence[float | None] | dict[str, Any]
# A server-side long-wait slice; the HTTP read timeout allows for it.
_WAIT_SLICE_S = 30.0


@dataclass
class _Call:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


ARROW = "application/vnd.apache.arrow.stream"
# From this many series on, a job goes out as an Arrow IPC stream: a tenth of the bytes of JSON and
# next to nothing for the API to parse. Series without an item_id are then named by their position.
ARROW_MIN_SERIES = 256


def _inputs(series: Sequence[Series]) -> list[dict[str, Any]]:
    return [dict(s) if isinstance(s, dict) else {"target": list(s)} for s in series]


def _forecast_call(path: str, model: str, series: Sequence[Series], prediction_length: int, params: dict) -> _Call:
    return _series_call(path, model, series, {"prediction_length": prediction_length, **params})


def _series_call(path: str, model: str, series: Sequence[Series], params: dict) -> _Call:
    """A request of series and parameters (a forecast's, an anomaly job's): JSON, or Arrow when large."""
    parameters = {k: v for k, v in params.items() if v is not None}
    inputs = _inputs(series)
    # A `start` has no column in the long format the client sends: such series go as JSON, so it is echoed.
    if len(inputs) >= ARROW_MIN_SERIES and all(set(s) <= {"target", "item_id"} for s in inputs):
        return _arrow_call(path, model, inputs, parameters)
    return _Call("POST", path, json={"model": model, "inputs": inputs, "parameters": parameters})


def _submit_call(model: str, series: Sequence[Series], prediction_length: int, wait: float, params: dict) -> _Call:
    call = _forecast_call("/v1/forecasts", model, series, prediction_length, params)
    if wait > 0:  # within one long-wait slice, which the HTTP read timeout allows for
        call.headers["Prefer"] = f"wait={min(wait, _WAIT_SLICE_S):g}"
    return call


def _arrow_call(path: str, model: str, inputs: list[dict[str, Any]], parameters: dict[str, Any]) -> _Call:
    """The same request as a long-format Arrow table, the parameters in the query string."""
    import io

    import numpy as np
    import pyarrow as pa

    lengths = [len(s["target"]) for s in inputs]
    ids = [str(s.get("item_id") if s.get("item_id") is not None else i) for i, s in enumerate(inputs)]
    values: np.ndarray | list[float] = (
        np.concatenate([np.array(s["target"], dtype=np.float64) for s in inputs]) if inputs else []
    )
    # Run-end encoded: one id and one end per series, not one per row (half the body otherwise).
    item_ids = pa.RunEndEncodedArray.from_arrays(pa.array(np.cumsum(lengths), type=pa.int32()), pa.array(ids))
    table = pa.table({"item_id": item_ids, "target": pa.array(values, from_pandas=True)})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    query = {
        name: ",".join(map(str, value)) if isinstance(value, list) else value for name, value in parameters.items()
    }
    return _Call(
        "POST", path, params={"model": model, **query}, content=sink.getvalue(), headers={"content-type": ARROW}
    )


def _table_call(job_id: str) -> _Call:
    return _Call("GET", f"/v1/forecasts/{job_id}", headers={"Accept": ARROW})


def _table(response: httpx.Response):
    import pyarrow as pa

    return pa.ipc.open_stream(response.content).read_all()


def _backtest_call(
    model: str,
    series: Series,
    first: int,
    last: int,
    prediction_length: int,
    step: int,
    context_length: int | None,
    extra: dict,
) -> _Call:
    body: dict[str, Any] = {
        "model": model,
        "series": _inputs([series])[0],
        "origins": {"first": first, "last": last, "step": step},
        "context_length": context_length,
        "parameters": {"prediction_length": prediction_length},
    }
    for name in ("quantile_levels", "num_samples", "temperature", "top_k", "top_p", "seed"):
        if extra.get(name) is not None:
            body["parameters"][name] = extra.pop(name)
    body.update({k: v for k, v in extra.items() if v is not None})  # season_length, known_covariates, callback_url
    return _Call("POST", "/v1/backtests", json=body)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the form this service sends); None when absent or a date."""
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _retry_delay(response: httpx.Response, attempt: int) -> float:
    after = _retry_after(response)
    return after if after is not None else min(0.5 * 2**attempt, 30.0)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code < 400:
        return response
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text[:500]}
    raise error_for(response.status_code, problem, _retry_after(response))


def _waiting(job_id: str, timeout: float | None, now=time.monotonic) -> Generator[_Call, JobView, JobView]:
    """Long-wait in slices until the job is terminal; sends `_Call`s, receives `JobView`s."""
    deadline = None if timeout is None else now() + timeout
    while True:
        slice_s = _WAIT_SLICE_S if deadline is None else max(0.0, min(_WAIT_SLICE_S, deadline - now()))
        job = yield _Call("GET", f"/v1/forecasts/{job_id}", params={"wait": slice_s})
        if job.status in TERMINAL:
            return job
        if deadline is not None and now() >= deadline:
            raise WaitTimeout(job_id, job.status.value)


class _Options(TypedDict):
    """The httpx client arguments both classes set."""

    base_url: str
    headers: dict[str, str]
    timeout: httpx.Timeout


class _Base:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_retries: int):
        self.max_retries = max_retries
        self._options: _Options = {
            "base_url": base_url.rstrip("/"),
            "headers": {"X-API-Key": api_key} if api_key else {},
            "timeout": httpx.Timeout(timeout + _WAIT_SLICE_S, connect=min(timeout, 10.0)),
        }

    def _should_retry(self, response: httpx.Response, attempt: int) -> bool:
        return response.status_code in (429, 503) and attempt < self.max_retries


class Client(_Base):
    """Blocking client. `api_key` goes out as `X-API-Key`."""

    def __init__(
        self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0, max_retries: int = 5, **httpx_args
    ):
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = httpx.Client(**self._options, **httpx_args)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            response = self._http.request(
                call.method, call.path, params=call.params, json=call.json, content=call.content, headers=call.headers
            )
            if not self._should_retry(response, attempt):
                return _checked(response)
            time.sleep(_retry_delay(response, attempt))
            attempt += 1

    def submit(
        self, model: str, series: Sequence[Series], prediction_length: int, *, wait: float = 0, **parameters
    ) -> JobView:
        """Queue a job; `series` holds value lists or `{"target", "item_id"?, "start"?}` dicts. With
        `wait` (seconds, at most 30), the same request also waits for the job (`Prefer: wait`): the
        answer is the finished job, results included, or the job as it stands when the wait ran out."""
        call = _submit_call(model, series, prediction_length, wait, parameters)
        return JobView.model_validate(self._send(call).json())

    def submit_backtest(
        self,
        model: str,
        series: Series,
        first: int,
        last: int,
        prediction_length: int,
        *,
        step: int = 1,
        context_length: int | None = None,
        **extra,
    ) -> JobView:
        """Queue a backtest of one series: a forecast from every origin first, first+step, … last
        (each from the `context_length` points before it), scored against the series' actuals.
        `extra`: quantile_levels, T5 sampling options, season_length, known_covariates, callback_url."""
        call = _backtest_call(model, series, first, last, prediction_length, step, context_length, extra)
        return JobView.model_validate(self._send(call).json())

    def submit_anomalies(self, model: str, series: Sequence[Series], *, level: float = 0.8, **parameters) -> JobView:
        """Queue an anomaly job: every point of each series from `score_from` on (default: after the
        first `context_length`) is flagged when it falls outside the central `level` interval of the
        model's forecast of it. `parameters`: context_length, score_from, horizon, num_samples, seed.
        `wait(job.id).anomalies` holds per series: start, lower, upper, median, anomaly, score."""
        call = _series_call("/v1/anomalies", model, series, {"level": level, **parameters})
        return JobView.model_validate(self._send(call).json())

    def submit_finetune(
        self, model: str, series: Sequence[Series], prediction_length: int, *, num_steps: int = 100, **parameters
    ) -> JobView:
        """Queue a fine-tuning job of `model` (amazon/chronos-2) on these series. `parameters`:
        context_length, finetune_mode ("lora" or "full"), learning_rate, batch_size, validation.
        `wait(job.id).finetuned_model` names the new model, which `submit`, `predict` and
        `submit_backtest` then take as `model` (for this API key only)."""
        params = {"prediction_length": prediction_length, "num_steps": num_steps, **parameters}
        return JobView.model_validate(self._send(_series_call("/v1/finetunes", model, series, params)).json())

    def delete_model(self, model: str) -> None:
        """Delete one of this key's fine-tuned models."""
        self._send(_Call("DELETE", f"/v1/models/{model}"))

    def get(self, job_id: str) -> JobView:
        """Any job (forecast, backtest, anomaly or fine-tuning job) as it stands, with its `progress`."""
        return JobView.model_validate(self._send(_Call("GET", f"/v1/forecasts/{job_id}")).json())

    def wait(self, job_id: str, timeout: float | None = None) -> JobView:
        """The job once terminal (any terminal status); `WaitTimeout` if `timeout` seconds pass first."""
        steps = _waiting(job_id, timeout)
        call = next(steps)
        while True:
            try:
                call = steps.send(JobView.model_validate(self._send(call).json()))
            except StopIteration as done:
                return done.value

    def predict(
        self,
        model: str,
        series: Sequence[Series],
        prediction_length: int,
        *,
        timeout: float | None = None,
        **parameters,
    ) -> JobView:
        """Forecast in one call on a sync-eligible model; if the server's wait runs out, keep waiting."""
        call = _forecast_call("/v1/predict", model, series, prediction_length, parameters)
        call.params = {"timeout": timeout} if timeout else {}
        job = JobView.model_validate(self._send(call).json())
        return job if job.status in TERMINAL else self.wait(job.id)

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._send(_Call("DELETE", f"/v1/forecasts/{job_id}")).json())

    def results_table(self, job_id: str):
        """A succeeded forecast's results as a `pyarrow.Table` (long format: item_id, step, mean, a
        column per level): the cheap way to fetch thousands of series. An anomaly job's: item_id,
        index, lower, upper, median, anomaly, score."""
        return _table(self._send(_table_call(job_id)))

    def models(self) -> list[ModelView]:
        return [ModelView.model_validate(m) for m in self._send(_Call("GET", "/v1/models")).json()]


class AsyncClient(_Base):
    """asyncio client: the methods of `Client`, awaited."""

    def __init__(
        self, base_url: str, api_key: str | None = None, *, timeout: float = 60.0, max_retries: int = 5, **httpx_args
    ):
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = httpx.AsyncClient(**self._options, **httpx_args)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            response = await self._http.request(
                call.method, call.path, params=call.params, json=call.json, content=call.content, headers=call.headers
            )
            if not self._should_retry(response, attempt):
                return _checked(response)
            await asyncio.sleep(_retry_delay(response, attempt))
            attempt += 1

    async def submit(
        self, model: str, series: Sequence[Series], prediction_length: int, *, wait: float = 0, **parameters
    ) -> JobView:
        call = _submit_call(model, series, prediction_length, wait, parameters)
        return JobView.model_validate((await self._send(call)).json())

    async def submit_backtest(
        self,
        model: str,
        series: Series,
        first: int,
        last: int,
        prediction_length: int,
        *,
        step: int = 1,
        context_length: int | None = None,
        **extra,
    ) -> JobView:
        call = _backtest_call(model, series, first, last, prediction_length, step, context_length, extra)
        return JobView.model_validate((await self._send(call)).json())

    async def submit_anomalies(
        self, model: str, series: Sequence[Series], *, level: float = 0.8, **parameters
    ) -> JobView:
        call = _series_call("/v1/anomalies", model, series, {"level": level, **parameters})
        return JobView.model_validate((await self._send(call)).json())

    async def submit_finetune(
        self, model: str, series: Sequence[Series], prediction_length: int, *, num_steps: int = 100, **parameters
    ) -> JobView:
        params = {"prediction_length": prediction_length, "num_steps": num_steps, **parameters}
        return JobView.model_validate((await self._send(_series_call("/v1/finetunes", model, series, params))).json())

    async def delete_model(self, model: str) -> None:
        await self._send(_Call("DELETE", f"/v1/models/{model}"))

    async def get(self, job_id: str) -> JobView:
        return JobView.model_validate((await self._send(_Call("GET", f"/v1/forecasts/{job_id}"))).json())

    async def wait(self, job_id: str, timeout: float | None = None) -> JobView:
        steps = _waiting(job_id, timeout)
        call = next(steps)
        while True:
            try:
                call = steps.send(JobView.model_validate((await self._send(call)).json()))
            except StopIteration as done:
                return done.value

    async def predict(
        self,
        model: str,
        series: Sequence[Series],
        prediction_length: int,
        *,
        timeout: float | None = None,
        **parameters,
    ) -> JobView:
        call = _forecast_call("/v1/predict", model, series, prediction_length, parameters)
        call.params = {"timeout": timeout} if timeout else {}
        job = JobView.model_validate((await self._send(call)).json())
        return job if job.status in TERMINAL else await self.wait(job.id)

    async def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate((await self._send(_Call("DELETE", f"/v1/forecasts/{job_id}"))).json())

    async def results_table(self, job_id: str):
        return _table(await self._send(_table_call(job_id)))

    async def models(self) -> list[ModelView]:
        return [ModelView.model_validate(m) for m in (await self._send(_Call("GET", "/v1/models"))).json()]
