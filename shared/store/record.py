"""The job record: its states, and its fields as one Redis hash holds them.

    queued ──► running ──► succeeded | failed
       │          │
       └──────────┴──► cancelled        (a running job stops at its next batch boundary)

`JobRecord` is the only spelling of the fields: the hash's field names are its attribute names,
and `to_hash` / `from_hash` convert by each attribute's type, so a new field is one line here.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobKind(StrEnum):
    FORECAST = "forecast"
    BACKTEST = "backtest"
    ANOMALY = "anomaly"
    FINETUNE = "finetune"

    @property
    def collection(self) -> str:
        """Where the API serves jobs of this kind: `/v1/<collection>/<id>`."""
        return {"forecast": "forecasts", "backtest": "backtests", "anomaly": "anomalies", "finetune": "finetunes"}[
            self.value
        ]


class Lane(StrEnum):
    ASYNC = "async"
    SYNC = "sync"
    # Fine-tuning runs: a queue of their own per base model, consumed by training workers only.
    TRAIN = "train"


@dataclass
class JobRecord:
    """A job as its hash holds it (`n_series`: origins for a backtest; `request`: what the worker
    needs besides the series, such as the forecast parameters)."""

    id: str
    model: str  # the model that runs it
    status: JobStatus
    lane: Lane
    n_series: int
    prediction_length: int
    created_at: float
    owner: str = ""
    # The model asked for, when another one runs the job (a fallback or an A/B candidate: api/routing.py).
    requested: str | None = None
    kind: JobKind = JobKind.FORECAST
    attempts: int = 0
    request: dict = field(default_factory=dict, repr=False)
    # The request's identity (series and parameters) under which a result is cached (shared/cache.py).
    identity: str = field(default="", repr=False)
    started_at: float | None = None
    finished_at: float | None = None
    inference_s: float | None = None
    worker: str | None = None
    weights: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    progress_done: int = 0
    cached: bool = False
    # Deliveries whose worker died while the job was in a forward pass (scripts start.lua).
    lost: int = 0
    # Someone waits on the job (a sync predict, `Prefer: wait`, a long-wait read): the answers channel
    # of the waiter's API process, where the worker that finishes the job publishes its answer
    # (lua/finish.lua) besides announcing its id.
    awaited: str | None = None
    callback_url: str | None = None
    callback_status: str | None = None
    callback_attempts: int = 0
    callback_error: str | None = None
    # A backtest's scores (stored); a forecast's predictions are loaded from its output list on
    # demand (`api.render.attach`) and never stored in the hash.
    backtest: dict | None = field(default=None, repr=False)
    # A fine-tuning job's training record (stored): the loss per step, and once it succeeded the
    # fine-tuned model's id and the validation scores of the base and fine-tuned models.
    finetune: dict | None = field(default=None, repr=False)
    # An ensemble's job (api/ensembles.py): its members' job ids and how they combine. Its state is
    # not stored but read from its members' each time it is read.
    ensemble: dict | None = field(default=None, repr=False)
    # A settled ensemble's members as the answer shows them, when asked for (never stored).
    members: list[dict] | None = field(default=None, repr=False, compare=False, metadata={"stored": False})
    predictions: list[dict] | None = field(default=None, repr=False, metadata={"stored": False})
    # An anomaly job's per-series intervals and flags, likewise loaded from its output list.
    anomalies: list[dict] | None = field(default=None, repr=False, metadata={"stored": False})
    # A succeeded job's output elements and items, when they were read with the record (`get`).
    results: tuple[list[bytes], bytes | None] | None = field(
        default=None, repr=False, compare=False, metadata={"stored": False}
    )

    @classmethod
    def from_hash(cls, h: Mapping[Any, Any]) -> JobRecord:
        """The record from HGETALL's reply (text or bytes); fields it lacks take their defaults."""
        values = {}
        for name, raw in h.items():
            read = _READERS.get(name)
            if read is not None and raw not in ("", b""):
                values[read[0]] = read[1](raw)
        return cls(**values)

    def to_hash(self) -> dict[str, str | int]:
        """The stored fields (those set: None and False are left out)."""
        return encode({f: getattr(self, f) for f in _CODECS})

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def timings(self) -> dict[str, float | None]:
        """Seconds spent queued, in the model, and from acceptance to the end."""

        def span(a: float | None, b: float | None) -> float | None:
            return round(b - a, 6) if a is not None and b is not None else None

        return {
            "queued_s": span(self.created_at, self.started_at),
            "inference_s": self.inference_s,
            "total_s": span(self.created_at, self.finished_at),
        }


def encode(values: Mapping[str, Any]) -> dict[str, str | int]:
    """Record fields as the hash stores them (None and False are not stored)."""
    return {name: _CODECS[name][0](value) for name, value in values.items() if value is not None and value is not False}


def _codec(kind: Any) -> tuple[Callable[[Any], Any], Callable[[str], Any]]:
    """(to the hash, from the hash) for an attribute's type."""
    if isinstance(kind, types.UnionType):  # X | None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        return (lambda v: "1"), (lambda s: s == "1")
    if kind is float:
        return repr, float  # repr: a float read back is the float written
    if kind is int:
        return int, int
    if kind is dict:
        return json.dumps, json.loads  # not orjson: json writes NaN (a backtest score can be), orjson refuses it
    return (lambda v: v.value if isinstance(v, StrEnum) else str(v)), kind


_HINTS = typing.get_type_hints(JobRecord)
_CODECS = {f.name: _codec(_HINTS[f.name]) for f in fields(JobRecord) if f.metadata.get("stored", True)}


def _from_bytes(read: Callable[[Any], Any]) -> Callable[[bytes], Any]:
    # float, int and json read bytes as they are; the rest read text. A worker reads every record
    # it claims, the API every record it answers: the decode is skipped where it is not needed.
    return read if read in (float, int, json.loads) else (lambda raw: read(raw.decode()))


# Each stored field by its name as text and as bytes (the clients decode replies or not): (attribute, reader).
_READERS: dict[str | bytes, tuple[str, Callable[[Any], Any]]] = {
    **{name: (name, codec[1]) for name, codec in _CODECS.items()},
    **{name.encode(): (name, _from_bytes(codec[1])) for name, codec in _CODECS.items()},
}
