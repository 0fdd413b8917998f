"""Series as arrays, from the request to the model and back: the one representation both sides share.

The API parses a body (JSON, Arrow or Parquet) into a `SeriesSet`: every target row (one
variate of one series) concatenated into one float array, with offsets, so validation runs
vectorized over all values at once. The job store keeps a job's series in Redis as one list
element per series (`encode`), so a worker reads exactly the series of its next forward pass
(LRANGE) and never the whole job. Results travel the same way: one element per series holding
a float32 array of shape [variates, 1 + quantile levels (+ samples), horizon] (`Result`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import msgspec
import numpy as np

# A missing value in a categorical covariate.
Categorical = list[str | None]


class Element(msgspec.Struct, array_like=True):
    """One series as stored in Redis (msgpack): float32 target rows, and Chronos-2 covariates
    (numeric ones as float32 bytes, NaN for missing; categorical ones as lists of strings)."""

    target: bytes
    variates: int = 1
    past: dict[str, bytes | Categorical] | None = None
    future: dict[str, bytes | Categorical] | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Element)


@dataclass
class SeriesSet:
    """The series of one request. `values` holds every target row back to back (float64 while
    validating, so out-of-range values are caught before the float32 the model gets);
    `offsets[r]:offsets[r + 1]` is row r; series i owns `variates[i]` consecutive rows."""

    values: np.ndarray
    offsets: np.ndarray
    variates: np.ndarray
    item_ids: list[str | None]
    starts: list[str | None]
    # Chronos-2 only: per series {"past": {name: values}, "future": {...}}, values a float array or strings.
    covariates: list[dict | None] | None = None

    def __len__(self) -> int:
        return len(self.variates)

    @property
    def row_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def first_rows(self) -> np.ndarray:
        """Index of each series' first row."""
        return np.concatenate(([0], np.cumsum(self.variates)[:-1])).astype(np.int64)

    def lengths(self) -> np.ndarray:
        """Points per series (per variate: the variates of a series share one length)."""
        return self.row_lengths[self.first_rows] if len(self) else np.zeros(0, np.int64)

    def rows(self, i: int) -> np.ndarray:
        """Series i's target as a [variates, length] array."""
        first = int(self.first_rows[i])
        start, end = self.offsets[first], self.offsets[first + int(self.variates[i])]
        return self.values[start:end].reshape(int(self.variates[i]), -1)

    @property
    def n_rows(self) -> int:
        """Target rows: the variates of every series together."""
        return len(self.offsets) - 1

    @property
    def multivariate(self) -> bool:
        return self.n_rows > len(self)  # some series has more than one variate

    def encode(self) -> list[bytes]:
        """One Redis list element per series (float32 values)."""
        values32 = self.values.astype(np.float32, copy=False)
        bounds = self.offsets[np.concatenate(([0], np.cumsum(self.variates))).astype(np.int64)]
        out = []
        for i in range(len(self)):
            target = values32[bounds[i] : bounds[i + 1]].tobytes()
            cov = self.covariates[i] if self.covariates else None
            if cov is None and self.variates[i] == 1:
                out.append(_encoder.encode(Element(target)))
                continue
            past, future = (({k: _stored(v) for k, v in cov.get(g, {}).items()} or None) if cov else None
                            for g in ("past", "future"))  # fmt: skip
            out.append(_encoder.encode(Element(target, int(self.variates[i]), past, future)))
        return out


def identity(series: SeriesSet, request: dict) -> str:
    """A digest of everything that determines a job's answer but the model: its series (values as
    the model gets them, shapes, item ids, starts, covariates) and the request (parameters, ...)."""
    h = hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode())
    h.update(series.values.astype(np.float32, copy=False).tobytes())
    h.update(series.offsets.astype(np.int64, copy=False).tobytes())
    h.update(series.variates.astype(np.int64, copy=False).tobytes())
    h.update(msgspec.msgpack.encode([series.item_ids, series.starts]))
    for cov in series.covariates or ():
        for group, named in sorted((cov or {}).items()):
            for name, values in sorted(named.items()):
                h.update(f"{group}:{name}".encode())
                h.update(msgspec.msgpack.encode(_stored(values)))
    return h.hexdigest()


def _stored(values) -> bytes | Categorical:
    return values if isinstance(values, list) else np.asarray(values, np.float32).tobytes()


@dataclass
class Decoded:
    """A stored series, read back by a worker: target rows as float32 [variates, length], and
    covariates as float32 arrays (numeric) or object arrays of strings/None (categorical)."""

    target: np.ndarray
    past: dict[str, np.ndarray] = field(default_factory=dict)
    future: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, target: list, past: dict | None = None, future: dict | None = None) -> Decoded:
        """From request-style lists (None for missing): one variate, or a list of variates."""
        rows = target if target and isinstance(target[0], list) else [target]
        return cls(
            np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=np.float32),
            {k: _python(v) for k, v in (past or {}).items()},
            {k: _python(v) for k, v in (future or {}).items()},
        )


def _python(values: list) -> np.ndarray:
    if any(isinstance(x, str) for x in values):
        return np.array(values, dtype=object)
    return np.array([np.nan if x is None else x for x in values], dtype=np.float32)


def decode(raw: bytes) -> Decoded:
    element = _decoder.decode(raw)
    target = np.frombuffer(element.target, np.float32).reshape(element.variates, -1)
    return Decoded(target, _arrays(element.past), _arrays(element.future))


def _arrays(group: dict | None) -> dict[str, np.ndarray]:
    return {
        name: np.array(values, dtype=object) if isinstance(values, list) else np.frombuffer(values, np.float32)
        for name, values in (group or {}).items()
    }


# An anomaly job's result element per series: float32 [len(ANOMALY_ROWS), scored points]. A point is
# an anomaly when its score is above 0; a missing actual has a NaN score.
ANOMALY_ROWS = ("lower", "upper", "median", "score")


@dataclass(frozen=True)
class ResultLayout:
    """How a job's result elements are laid out: per series float32 [variates, rows, horizon],
    rows = mean, one per quantile level, then `samples` sample paths (T5, when asked)."""

    levels: tuple[float, ...]
    horizon: int
    samples: int = 0

    @property
    def rows(self) -> int:
        return 1 + len(self.levels) + self.samples

    def array(self, raw: bytes) -> np.ndarray:
        return np.frombuffer(raw, np.float32).reshape(-1, self.rows, self.horizon)

    def forecast(self, raw: bytes, univariate: bool = True) -> dict:
        """One series' result as the JSON API shows it: mean, one key per level, samples if any.
        Values are float64 (the float32 numbers exactly), so a JSON round trip reproduces them."""
        block = self.array(raw).astype(np.float64)
        squeeze = block.shape[0] == 1 and univariate
        series: dict = {}

        def rows(values: np.ndarray) -> np.ndarray:  # orjson writes C-contiguous arrays only
            return values[0] if squeeze else np.ascontiguousarray(values)

        series["mean"] = rows(block[:, 0])
        for j, level in enumerate(self.levels):
            series[str(level)] = rows(block[:, 1 + j])
        if self.samples:
            series["samples"] = rows(block[:, 1 + len(self.levels) :])
        return series
