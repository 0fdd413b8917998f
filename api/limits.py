"""Configured request limits: a body over the size cap is 413, anything else over a limit is 422."""

from __future__ import annotations

from shared.catalog import ModelSpec
from shared.schemas import ForecastRequest
from shared.settings import Settings

from api.problems import Problem


def check(request: ForecastRequest, spec: ModelSpec, settings: Settings) -> None:
    """Raise a 422 `Problem` naming the first field over its configured limit or not for this model."""
    if len(request.inputs) > settings.max_series:
        raise _over("inputs", f"{len(request.inputs)} series; at most {settings.max_series} per request")
    for i, series in enumerate(request.inputs):
        if len(series.target) > settings.max_points:
            raise _over(f"inputs[{i}].target", f"{len(series.target)} points; at most {settings.max_points}")
    params = request.parameters
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
    offending = [*params.sampling(), *(["return_samples"] if params.return_samples else [])]
    if offending and not spec.sample_based:
        field = f"parameters.{offending[0]}"
        raise Problem(
            422,
            "not-sample-based",
            f"{field}: {spec.id} outputs quantiles directly; sampling options apply to T5 models only",
            field=field,
        )


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
