"""Configured request limits and what each model accepts: a body over the size cap is 413; a field over
a limit, or input the model cannot take (covariates outside Chronos-2, sampling options outside T5), is 422."""

from __future__ import annotations

import math

from shared.catalog import ModelSpec
from shared.schemas import BacktestRequest, ForecastRequest, SeriesInput
from shared.settings import Settings

from api.problems import Problem


def check(request: ForecastRequest, spec: ModelSpec, settings: Settings, prefix: str | None = None) -> None:
    """Raise a 422 `Problem` naming the first field over its configured limit or not for this model.
    `prefix` names the series field when the request stands for a backtest's single series."""
    if len(request.inputs) > settings.max_series:
        raise _over("inputs", f"{len(request.inputs)} series; at most {settings.max_series} per request")
    params = request.parameters
    for i, series in enumerate(request.inputs):
        at = prefix or f"inputs[{i}]"
        if series.length > settings.max_points:
            raise _over(f"{at}.target", f"{series.length} points; at most {settings.max_points}")
        _check_covariates(at, series, params.prediction_length, spec, settings)
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
    if offending and not spec.sample_based:
        field = f"parameters.{offending[0]}"
        raise Problem(
            422,
            "not-sample-based",
            f"{field}: {spec.id} outputs quantiles directly; sampling options apply to T5 models only",
            field=field,
        )


def check_backtest(request: BacktestRequest, spec: ModelSpec, settings: Settings) -> None:
    """A backtest: its series as a forecast's, its origins inside the series, within the configured limits."""
    series, params = request.series, request.parameters
    check(ForecastRequest(model=request.model, inputs=[series], parameters=params), spec, settings, prefix="series")
    if series.multivariate:
        raise _unsupported("series.target", "a backtest scores one target variate")
    if series.future_covariates:
        raise _invalid("series.future_covariates", "give every covariate's whole history in past_covariates; "
                       "name the ones known in advance in known_covariates")  # fmt: skip
    for i, name in enumerate(request.known_covariates):
        if name not in (series.past_covariates or {}):
            raise _invalid(f"known_covariates[{i}]", f"{name!r} is not among series.past_covariates")
    origins = request.origins
    if origins.last < origins.first:
        raise _invalid("origins.last", f"{origins.last} comes before origins.first ({origins.first})")
    if origins.last > series.length:
        raise _invalid("origins.last", f"{origins.last} is past the series' end ({series.length} points)")
    count = len(origins.values())
    if count > settings.max_backtest_origins:
        raise _over("origins", f"{count} origins; at most {settings.max_backtest_origins}")


def _check_covariates(at: str, series: SeriesInput, horizon: int, spec: ModelSpec, settings: Settings) -> None:
    """Covariates and several target variates: Chronos-2 only, and every length lined up."""
    if not spec.takes_covariates:
        for name in ("past_covariates", "future_covariates"):
            if getattr(series, name):
                raise _unsupported(f"{at}.{name}", f"{spec.id} takes no covariates; amazon/chronos-2 does")
        if series.multivariate:
            raise _unsupported(
                f"{at}.target", f"{spec.id} forecasts one variate per series; amazon/chronos-2 takes several"
            )
        return
    past, future = series.past_covariates or {}, series.future_covariates or {}
    rows = (len(series.target) if series.multivariate else 1) + len(past)
    if rows > settings.max_variates:
        raise _over(f"{at}.target", f"{rows} target variates and covariates; at most {settings.max_variates}")
    for group, values_of, length, what in (
        ("past_covariates", past, series.length, f"the target's {series.length} points"),
        ("future_covariates", future, horizon, f"parameters.prediction_length ({horizon})"),
    ):
        for name, values in values_of.items():
            field = f"{at}.{group}.{name}"
            if len(values) != length:
                raise _invalid(field, f"{len(values)} values; it must match {what}")
            if any(isinstance(x, float) and math.isinf(x) for x in values):
                raise _invalid(field, "holds an infinite value; use null or NaN for missing values")
            if group == "future_covariates":
                if name not in past:
                    raise _invalid(field, "has no past values: name it in past_covariates too")
                if _kind(values) != _kind(past[name]) and _kind(values) and _kind(past[name]):
                    raise _invalid(field, "mixes numeric and categorical values with its past_covariates")


def _kind(values: list) -> str | None:
    """'categorical' for strings, 'numeric' for numbers, None when every value is missing."""
    present = next((x for x in values if x is not None), None)
    return None if present is None else ("categorical" if isinstance(present, str) else "numeric")


def _invalid(field: str, detail: str) -> Problem:
    message = f"{field}: {detail}"
    return Problem(422, "validation-error", message, field=field, errors=[{"field": field, "message": detail}])


def _unsupported(field: str, detail: str) -> Problem:
    return Problem(422, "unsupported-input", f"{field}: {detail}", field=field)


def _over(field: str, detail: str) -> Problem:
    return Problem(422, "limit-exceeded", f"{field}: {detail}", field=field)


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes` with 413.

    A declared Content-Length is checked up front (the server never delivers more than it
    declares). A chunked body is read here, up to the limit, then replayed to the app.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send)
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
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
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

    async def _refuse(self, scope, receive, send):
        problem = Problem(413, "body-too-large", f"request body over {self.max_bytes} bytes (MAX_BODY_BYTES)")
        await problem.response(scope.get("path"))(scope, receive, send)
