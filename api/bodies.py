"""Request bodies, read after the caller is authenticated and parsed straight into arrays.

Routes declare no body parameter, so FastAPI reads nothing before `Caller` has checked the
key; the route then calls `read` (size cap and read deadline enforced while the bytes arrive)
and one of the parsers here:

- JSON (`application/json`): msgspec first decodes the structure with every target left as raw
  JSON (a scan, ~30 ms for 40 MB), so series and point limits are enforced before any number
  is parsed; each target is then decoded with strict types (no bools, no numeric strings) into
  a float array. Bodies with the non-standard `NaN`/`Infinity` literals Python's json emits are
  parsed by pydantic-core's parser instead (msgspec refuses them) and converted the same way.
  The pydantic models in shared/schemas.py stay the documented contract (OpenAPI, examples);
  parameters are validated by them directly (strict), and the error tests and the property test
  in tests/test_bodies.py hold this parser to them.
- Arrow IPC streams and Parquet (long format: `item_id`, optional `timestamp`, `target`, and
  for Chronos-2 past-covariate columns), with the parameters in the query string.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, cast, overload

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pydantic_core
from fastapi import Request
from msgspec import Meta, Raw, Struct
from pydantic import BaseModel, ValidationError

from shared.schemas import ForecastParameters, ForecastRequest, SeriesInput, Values
from shared.series import SeriesSet
from shared.settings import Settings

from api import auth
from api.problems import Problem, validation_problem

JSON = "application/json"
ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
COLUMNAR = (ARROW, PARQUET)

T = TypeVar("T")
ItemId = Annotated[str, Meta(max_length=256)]
Start = Annotated[str, Meta(max_length=64)]


class _Series(Struct, Generic[T], forbid_unknown_fields=True):
    target: T
    item_id: ItemId | None = None
    start: Start | None = None
    past_covariates: dict[str, T] | None = None
    future_covariates: dict[str, T] | None = None


class _Forecast(Struct, Generic[T], forbid_unknown_fields=True):
    model: str
    inputs: list[_Series[T]]
    parameters: T
    callback_url: Annotated[str, Meta(max_length=2048)] | None = None


class _Design(Struct, Generic[T], forbid_unknown_fields=True):
    """The body of `/predict` (`input`, one series) and `/predict/batch` (`requests`); both also
    take the native `inputs`. Which names a route takes is its `Shape`."""

    model: str
    parameters: T
    input: _Series[T] | None = None
    requests: list[_Series[T]] | None = None
    inputs: list[_Series[T]] | None = None
    callback_url: Annotated[str, Meta(max_length=2048)] | None = None


@dataclass(frozen=True)
class Shape:
    """Where a forecast body holds its series: the names it may use, and whether it holds exactly one."""

    names: tuple[str, ...]
    single: bool = False


NATIVE = Shape(("inputs",))
ONE = Shape(("input", "inputs"), single=True)
BATCH = Shape(("requests", "inputs"))

_STRUCTURE = msgspec.json.Decoder(_Forecast[Raw])
_DESIGN = msgspec.json.Decoder(_Design[Raw])
_NUMBERS = msgspec.json.Decoder(list[float | None])
_ROWS = msgspec.json.Decoder(list[list[float | None]])
_LABELS = msgspec.json.Decoder(list[str | None])


# The parameters a series body carries: a forecast's, or an anomaly job's (same body otherwise).
P = TypeVar("P", bound=BaseModel)


@dataclass
class ForecastJob(Generic[P]):
    """A parsed series request (a forecast's, or an anomaly job's): what the service validates and stores."""

    model: str
    parameters: P
    series: SeriesSet
    callback_url: str | None = None
    # Per series: the target came as a list of variates (its answer then holds one list per variate).
    nested: list[bool] | None = None
    # What the body called its series (`input` for /predict's one series), for error messages.
    list_name: str = "inputs"

    def field(self, i: int) -> str:
        return self.list_name if self.list_name == "input" else f"{self.list_name}[{i}]"


async def read(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 past `max_bytes` and 408 when it takes over `timeout_s`."""
    chunks: list[bytes] = []
    size = 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise Problem(413, "body-too-large", f"request body over {max_bytes} bytes (MAX_BODY_BYTES)")
            chunks.append(chunk)

    try:  # asyncio.timeout, not wait_for: no task of its own per body (4 % of the API's CPU in a flood)
        async with asyncio.timeout(timeout_s):
            await receive()
    except TimeoutError:
        raise Problem(408, "body-timeout", f"the request body did not arrive within {timeout_s:g}s") from None
    return b"".join(chunks)


def media_type(request: Request) -> str:
    """The body's media type: JSON unless it says Arrow or Parquet (415 for anything else that is not JSON)."""
    given = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
    if given in COLUMNAR:
        return given
    if given in ("", JSON, "text/json") or given.endswith("+json"):
        return JSON
    raise Problem(415, "unsupported-media-type", f"bodies are {JSON}, {ARROW} or {PARQUET}, not {given}")


# -- JSON ---------------------------------------------------------------------------------


def forecast_json(
    body: bytes,
    settings: Settings,
    shape: Shape = NATIVE,
    permit: Callable[[str], None] | None = None,
    schema: type[BaseModel] = ForecastParameters,
) -> ForecastJob:
    """Parse a JSON forecast request (see the module docstring), its parameters by `schema`.
    `permit(model)` runs once the structure is read, before any number is parsed (it raises to
    refuse the model)."""
    try:
        decoded = _STRUCTURE.decode(body) if shape is NATIVE else _DESIGN.decode(body)
    except msgspec.ValidationError as exc:
        raise _msgspec_problem(exc) from None
    except msgspec.DecodeError:
        return _forecast_literals(body, settings, shape, permit, schema)
    request, name = _native(decoded, shape)
    if permit:
        permit(request.model)
    _check_counts(request.inputs, settings, name)
    for i, series in enumerate(request.inputs):
        _check_points(series.target, f"{_at(name, i)}.target", settings)
    return _assemble(request, settings, _decode_raw, schema, name)


def _forecast_literals(
    body: bytes, settings: Settings, shape: Shape, permit: Callable[[str], None] | None, schema: type[BaseModel]
) -> ForecastJob:
    """Bodies msgspec refuses: malformed JSON (400), or JSON with NaN/Infinity literals."""
    try:
        tree = pydantic_core.from_json(body, allow_inf_nan=True)
    except ValueError:
        raise Problem(400, "malformed-json", "the request body is not valid JSON") from None
    try:
        converted: _Forecast | _Design = (
            msgspec.convert(tree, _Forecast[Any]) if shape is NATIVE else msgspec.convert(tree, _Design[Any])
        )
    except msgspec.ValidationError as exc:
        raise _msgspec_problem(exc) from None
    request, name = _native(converted, shape)
    if permit:
        permit(request.model)
    _check_counts(request.inputs, settings, name)
    return _assemble(request, settings, _convert_tree, schema, name)


def _native(request: _Forecast | _Design, shape: Shape) -> tuple[_Forecast, str]:
    """A design-shaped body as the native one, and the name its series came under."""
    if isinstance(request, _Forecast):
        return request, "inputs"
    given = [name for name in ("input", "requests", "inputs") if getattr(request, name) is not None]
    if not given or given[0] not in shape.names:
        field = given[0] if given else shape.names[0]
        raise _invalid(field, f"this route takes its series as `{'` or `'.join(shape.names)}`")
    if len(given) > 1:
        raise _invalid(given[1], f"give the series once, as `{given[0]}`")
    name = given[0]
    inputs: list[_Series] = [request.input] if request.input is not None else getattr(request, name)
    if shape.single and len(inputs) != 1:
        raise _invalid(name, f"this route takes one series, not {len(inputs)}; POST /predict/batch takes several")
    return _Forecast(request.model, inputs, request.parameters, request.callback_url), name


def _at(name: str, i: int) -> str:
    """Where series i sits in the body: `inputs[i]`, `requests[i]`, or `input` (the one series)."""
    return name if name == "input" else f"{name}[{i}]"


def _check_counts(inputs: list, settings: Settings, name: str = "inputs") -> None:
    if not inputs:
        raise _invalid(name, "must hold at least one series")
    if len(inputs) > settings.max_series:
        raise _over(name, f"{len(inputs)} series; at most {settings.max_series} per request")


def _check_points(raw: Raw, field: str, settings: Settings) -> None:
    """Before parsing a target's numbers: refuse one that cannot fit the limits whatever its shape.
    A number takes at least two bytes with its comma, so a short target needs no count."""
    most = settings.max_points * settings.max_variates
    if len(raw) >= 2 * most and bytes(raw).count(b",") + 1 > most:
        raise _over(field, f"more than {settings.max_points} points")


def _decode_raw(raw: Raw | bytes, field: str) -> tuple[list, bool]:
    """A raw JSON array of numbers (or of arrays of numbers) as lists; strict types."""
    text = bytes(raw)
    nested = text.lstrip()[1:].lstrip()[:1] == b"["
    try:
        return (_ROWS if nested else _NUMBERS).decode(text), nested
    except msgspec.ValidationError as exc:
        raise _msgspec_problem(exc, field) from None
    except msgspec.DecodeError:
        return _convert_tree(pydantic_core.from_json(text, allow_inf_nan=True), field)


def _convert_tree(value: Any, field: str) -> tuple[list, bool]:
    """An already parsed target (floats, None, maybe NaN/inf) checked with the same strict types."""
    nested = isinstance(value, list) and bool(value) and isinstance(value[0], list)
    try:
        return msgspec.convert(value, list[list[float | None]] if nested else list[float | None]), nested
    except msgspec.ValidationError as exc:
        raise _msgspec_problem(exc, field) from None


def _covariate(raw: Any, field: str) -> np.ndarray | list:
    """A covariate: numbers (float array, NaN for missing) or strings (categorical, None for missing)."""
    if isinstance(raw, Raw):
        text = bytes(raw)
        try:
            return np.array(_NUMBERS.decode(text), dtype=np.float64)
        except msgspec.ValidationError:
            try:
                return _LABELS.decode(text)
            except msgspec.ValidationError as exc:
                raise _msgspec_problem(exc, field) from None
        except msgspec.DecodeError:
            raw = pydantic_core.from_json(text, allow_inf_nan=True)
    try:
        return np.array(msgspec.convert(raw, list[float | None]), dtype=np.float64)
    except msgspec.ValidationError:
        try:
            return msgspec.convert(raw, list[str | None])
        except msgspec.ValidationError as exc:
            raise _msgspec_problem(exc, field) from None


def _assemble(
    request: _Forecast, settings: Settings, decode, schema: type[BaseModel], name: str = "inputs"
) -> ForecastJob:
    rows: list[np.ndarray] = []
    variates, nested_flags, covariates = [], [], []
    for i, series in enumerate(request.inputs):
        at = f"{_at(name, i)}.target"
        values, nested = decode(series.target, at)
        if nested:
            if not values or len({len(v) for v in values}) != 1 or not values[0]:
                raise _invalid(at, "target variates must be non-empty and share one length")
            rows.extend(np.array(v, dtype=np.float64) for v in values)
        else:
            rows.append(np.array(values, dtype=np.float64))
        variates.append(len(values) if nested else 1)
        nested_flags.append(nested)
        cov = {}
        for group in ("past_covariates", "future_covariates"):
            named = getattr(series, group)
            if named:
                cov[group.split("_")[0]] = {
                    key: _covariate(value, f"{_at(name, i)}.{group}.{key}") for key, value in named.items()
                }
        covariates.append(cov or None)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    series_set = SeriesSet(
        values=np.concatenate(rows) if rows else np.zeros(0),
        offsets=np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
        variates=np.array(variates, dtype=np.int64),
        item_ids=[s.item_id for s in request.inputs],
        starts=[s.start for s in request.inputs],
        covariates=covariates if any(c is not None for c in covariates) else None,
    )
    return ForecastJob(
        model=request.model,
        parameters=parameters(request.parameters, schema=schema),
        series=series_set,
        callback_url=request.callback_url,
        nested=nested_flags if any(nested_flags) else None,
        list_name=name,
    )


def parameters(raw: Any, prefix: str = "parameters", schema: type[BaseModel] = ForecastParameters) -> Any:
    """Forecast (or `schema`) parameters, validated by the documented model itself (strict: no coercion)."""
    try:
        if isinstance(raw, Raw):
            return schema.model_validate_json(bytes(raw), strict=True)
        return schema.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise validation_problem(exc.errors(), prefix) from None


# -- Arrow and Parquet --------------------------------------------------------------------

_RESERVED = ("item_id", "timestamp", "target")


def forecast_columnar(
    body: bytes, kind: str, query: dict[str, str], settings: Settings, schema: type[BaseModel] = ForecastParameters
) -> ForecastJob:
    """A long-format table (one row per series and time step) and the parameters from the query string."""
    try:
        if kind == ARROW:
            table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        else:
            table = pq.read_table(pa.BufferReader(body))
    except (pa.ArrowInvalid, OSError) as exc:
        raise Problem(400, "malformed-body", f"not a readable {kind} body: {exc}") from None
    if "target" not in table.column_names:
        raise _invalid("target", "the table needs a `target` column (and `item_id` for several series)")
    n = table.num_rows
    column = table["item_id"].combine_chunks() if "item_id" in table.column_names else None
    if column is not None and pa.types.is_run_end_encoded(column.type):
        run_names = column.values.to_pylist()
        if column.offset == 0 and len(set(run_names)) == len(run_names):
            # Run-end encoded, each run its own series (what the client sends): the boundaries are given.
            names = [None if x is None else str(x) for x in run_names]
            counts = np.diff(np.concatenate(([0], column.run_ends.to_numpy())))
            column = None
        else:  # a series in several runs: read it as if it came plainly
            column = pc.run_end_decode(column)
            table = table.set_column(table.schema.get_field_index("item_id"), "item_id", column)
    if column is not None:
        # A dictionary-encoded column needs no hashing of one string per row.
        ids = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(pc.cast(column, pa.string()))
        codes = ids.indices.to_numpy(zero_copy_only=False)
        run_starts = np.flatnonzero(np.concatenate(([True], codes[1:] != codes[:-1]))) if n else np.zeros(0, np.int64)
        run_codes = codes[run_starts]
        if len(np.unique(run_codes)) == len(run_codes):  # the usual layout: each series' rows together
            names = [ids.dictionary[int(c)].as_py() for c in run_codes]
            counts = np.diff(np.append(run_starts, n))
        else:
            codes, names = _first_appearance(codes, run_starts, ids.dictionary.to_pylist())
            order = np.argsort(codes, kind="stable")
            table = table.take(pa.array(order))
            counts = np.bincount(codes, minlength=len(names))
    elif "item_id" not in table.column_names:
        names, counts = [None], np.array([n], dtype=np.int64)
    if len(names) > settings.max_series:
        raise _over("item_id", f"{len(names)} series; at most {settings.max_series} per request")
    if n and counts.max() > settings.max_points:
        raise _over("target", f"{int(counts.max())} points in one series; at most {settings.max_points}")
    values = _numeric(table["target"], "target")
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    starts: list[str | None] = [None] * len(names)
    if "timestamp" in table.column_names:
        column = table["timestamp"].combine_chunks()
        starts = [None if (v := column[int(o)].as_py()) is None else str(v) for o in offsets[:-1]]
    extra = [c for c in table.column_names if c not in _RESERVED]
    covariates: list[dict | None] | None = None
    if extra:
        columns = {c: _column(table[c], c) for c in extra}
        covariates = [
            {"past": {c: v[offsets[i] : offsets[i + 1]] for c, v in columns.items()}} for i in range(len(names))
        ]
    series_set = SeriesSet(
        values=values, offsets=offsets, variates=np.ones(len(names), dtype=np.int64),
        item_ids=[None if x is None else str(x) for x in names], starts=starts, covariates=covariates,
    )  # fmt: skip
    query = dict(query)
    model = query.pop("model", None)
    if not model:
        raise _invalid("model", "required in the query string for an Arrow or Parquet body")
    callback_url = query.pop("callback_url", None)
    params: dict[str, Any] = dict(query)
    if "quantile_levels" in params:
        params["quantile_levels"] = [x for x in params["quantile_levels"].split(",") if x]
    try:
        parsed = schema.model_validate(params)  # query strings: numbers arrive as text
    except ValidationError as exc:
        raise validation_problem(exc.errors(), "") from None
    return ForecastJob(model=model, parameters=parsed, series=series_set, callback_url=callback_url)


def _first_appearance(codes: np.ndarray, run_starts: np.ndarray, names: list) -> tuple[np.ndarray, list]:
    """Series renumbered in the order of their first row (rows of one series are not together),
    dictionary entries no row uses dropped."""
    run_codes = codes[run_starts]
    _, first_run = np.unique(run_codes, return_index=True)
    used = run_codes[np.sort(first_run)]
    renumber = np.full(len(names), -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    return renumber[codes], [names[i] for i in used]


def _numeric(column, field: str) -> np.ndarray:

    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_decimal(column.type)):
        raise _invalid(field, f"must be numeric, not {column.type}")
    # float32 stays float32 (no copy when nothing is null): it cannot hold a value beyond the models' range.
    wanted = pa.float32() if column.type in (pa.float16(), pa.float32()) else pa.float64()
    return pc.cast(column, wanted).to_numpy(zero_copy_only=False)


def _column(column, field: str) -> np.ndarray | list:

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_pylist()
    return _numeric(column, field)


# -- errors -------------------------------------------------------------------------------

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:missing required|contains unknown) field `(?P<name>[^`]+)`")


def _msgspec_problem(exc: msgspec.ValidationError, prefix: str = "") -> Problem:
    """msgspec's message (`Expected `float | null`, got `str` - at `$.inputs[0].target[1]``) as our 422."""
    message = str(exc)
    path = ""
    if match := _PATH.search(message):
        path, message = match["path"], message[: match.start()]
    if named := _NAMED.search(message):
        path += f".{named['name']}"
    field = (prefix + path).lstrip(".")
    return _invalid(field, message)


def _invalid(field: str, detail: str) -> Problem:
    return Problem(
        422, "validation-error", f"{field}: {detail}", field=field, errors=[{"field": field, "message": detail}]
    )


def _over(field: str, detail: str) -> Problem:
    return Problem(422, "limit-exceeded", f"{field}: {detail}", field=field)


# -- from the documented models (compat calls and backtests: one series, speed does not matter) --


def series_from_inputs(inputs: list[SeriesInput]) -> SeriesSet:
    """Validated pydantic series as a `SeriesSet`."""
    rows: list[np.ndarray] = []
    variates: list[int] = []
    covariates: list[dict | None] = []
    for series in inputs:
        target = cast(list[Values], series.target) if series.multivariate else [cast(Values, series.target)]
        rows.extend(np.array([np.nan if x is None else x for x in row], dtype=np.float64) for row in target)
        variates.append(len(target))
        cov = {}
        for group in ("past", "future"):
            named = getattr(series, f"{group}_covariates")
            if named:
                cov[group] = {name: _python_covariate(values) for name, values in named.items()}
        covariates.append(cov or None)
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    return SeriesSet(
        values=np.concatenate(rows) if rows else np.zeros(0),
        offsets=np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
        variates=np.array(variates, dtype=np.int64),
        item_ids=[s.item_id for s in inputs],
        starts=[s.start for s in inputs],
        covariates=covariates if any(c is not None for c in covariates) else None,
    )


def _python_covariate(values: list) -> np.ndarray | list:
    if any(isinstance(x, str) for x in values):
        return list(values)
    return np.array([np.nan if x is None else x for x in values], dtype=np.float64)


def forecast_job(request: ForecastRequest) -> ForecastJob:
    """A pydantic `ForecastRequest` (built by the compat translations) as a `ForecastJob`."""
    nested = [s.multivariate for s in request.inputs]
    return ForecastJob(
        model=request.model,
        parameters=request.parameters,
        series=series_from_inputs(request.inputs),
        callback_url=request.callback_url,
        nested=nested if any(nested) else None,
    )


# -- OpenAPI: routes read their body themselves, so they describe it themselves ------------

_DOCUMENTED: list[type[BaseModel]] = []


def documented_body(model: type[BaseModel], columnar: bool = False, required: bool = True) -> dict:
    """`openapi_extra` describing a body the route reads itself: `model` as JSON (and, if
    `columnar`, an Arrow stream or Parquet file with the parameters in the query string)."""
    _DOCUMENTED.append(model)
    content: dict = {JSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if columnar:
        for kind in COLUMNAR:
            content[kind] = {
                "schema": {"type": "string", "format": "binary"},
                "description": "Long format: item_id, optional timestamp, target (and Chronos-2 past-covariate "
                "columns); model, prediction_length, quantile_levels (comma-separated), ... in the query string.",
            }
    return {"requestBody": {"required": required, "content": content}}


def install(app) -> None:
    """Add the models of self-read bodies to the app's OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in _DOCUMENTED:
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in model_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = model_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


async def forecast(
    request: Request, settings: Settings, shape: Shape = NATIVE, schema: type[BaseModel] = ForecastParameters
) -> ForecastJob:
    """Read and parse a forecast body (parameters by `schema`) of any accepted media type, refusing
    a model the caller's key may not use as soon as the model is known: before reading an Arrow or
    Parquet body (its model is in the query string), before parsing any number of a JSON one.
    Large JSON is parsed on a thread: its per-series steps let the event loop run between them."""
    kind = media_type(request)
    limit = settings.max_columnar_body_bytes if kind in COLUMNAR else settings.max_body_bytes

    def permit(model: str) -> None:
        auth.permit_model(request, model)

    if kind in COLUMNAR and "model" in request.query_params:
        permit(request.query_params["model"])
    body = await read(request, limit, settings.body_timeout_s)
    if kind in COLUMNAR:
        job = forecast_columnar(body, kind, dict(request.query_params), settings, schema)
        if shape.single and len(job.series) != 1:
            raise _invalid("item_id", f"this route takes one series, not {len(job.series)}")
        return job
    if len(body) < 1 << 20:
        return forecast_json(body, settings, shape, permit, schema)
    return await asyncio.to_thread(forecast_json, body, settings, shape, permit, schema)


Model = TypeVar("Model", bound=BaseModel)


@overload
async def model_body(
    request: Request, settings: Settings, model: type[Model], optional: Literal[False] = False
) -> Model: ...
@overload
async def model_body(request: Request, settings: Settings, model: type[Model], optional: bool) -> Model | None: ...
async def model_body(request: Request, settings: Settings, model: type[Model], optional: bool = False) -> Model | None:
    """A small JSON body validated by its documented pydantic model, strictly (no coercion); with
    `optional`, None for an empty body."""
    if media_type(request) != JSON:
        raise Problem(415, "unsupported-media-type", f"this route takes {JSON} bodies")
    body = await read(request, settings.max_body_bytes, settings.body_timeout_s)
    if optional and not body.strip():
        return None
    try:
        tree = pydantic_core.from_json(body, allow_inf_nan=True)
    except ValueError:
        raise Problem(400, "malformed-json", "the request body is not valid JSON") from None
    try:
        return model.model_validate(tree, strict=True)
    except ValidationError as exc:
        raise validation_problem(exc.errors()) from None


def warm_up(settings: Settings) -> None:
    """Parse one tiny Arrow and one tiny Parquet body, so the first real one does not pay for
    pyarrow's lazy set-up (compute kernels, readers: ~0.2 s), as workers warm their model."""
    table = pa.table({"item_id": pa.DictionaryArray.from_arrays(pa.array([0, 0], pa.int32()), pa.array(["a"])),
                      "target": pa.array([1.0, 2.0], pa.float32())})  # fmt: skip
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    forecast_columnar(sink.getvalue().to_pybytes(), ARROW, {"model": "m", "prediction_length": "1"}, settings)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    forecast_columnar(sink.getvalue().to_pybytes(), PARQUET, {"model": "m", "prediction_length": "1"}, settings)


def backtest_columnar(body: bytes, kind: str, query: dict[str, str], settings: Settings):
    """A backtest's one series as a long-format table (`target`, optional `timestamp`, Chronos-2
    past-covariate columns), everything else in the query string: model, first, last, step,
    context_length, season_length, known_covariates and quantile_levels (comma-separated), and the
    forecast parameters."""
    from shared.schemas import BacktestRequest

    rest: dict[str, Any] = dict(query)  # what is left to read; quantile_levels becomes a list
    job = forecast_columnar(body, kind, {"model": rest.get("model", ""), "prediction_length": "1"}, settings)
    if len(job.series) != 1:
        raise _invalid("item_id", f"a backtest takes one series, not {len(job.series)}")
    values = job.series.rows(0)[0]
    series: dict[str, Any] = {"target": [None if np.isnan(x) else float(x) for x in values.tolist()]}
    if job.series.item_ids[0] is not None:
        series["item_id"] = job.series.item_ids[0]
    past = (job.series.covariates or [None])[0]
    if past:
        series["past_covariates"] = {
            name: v if isinstance(v, list) else [None if np.isnan(x) else float(x) for x in v.tolist()]
            for name, v in past["past"].items()
        }
    origins = {name: rest.pop(name) for name in ("first", "last", "step") if name in rest}
    outer: dict[str, Any] = {
        name: rest.pop(name) for name in ("context_length", "season_length", "callback_url") if name in rest
    }
    if "known_covariates" in rest:
        outer["known_covariates"] = [x for x in rest.pop("known_covariates").split(",") if x]
    model = rest.pop("model", None)
    if "quantile_levels" in rest:
        rest["quantile_levels"] = [x for x in rest["quantile_levels"].split(",") if x]
    try:  # query strings carry numbers as text: validated leniently, then as the documented model
        return BacktestRequest.model_validate(
            {"model": model, "series": series, "origins": origins, "parameters": rest, **outer}
        )
    except ValidationError as exc:
        raise validation_problem(exc.errors()) from None
