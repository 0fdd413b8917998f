"""The job record and its state machine.

    queued ──► running ──► succeeded | failed
       │          │
       └──────────┴──► cancelled        (a running job stops at its next batch boundary)

A job is one Redis hash (`keys.job(id)`). Every transition is one Lua script, so
the API and any number of workers (and redeliveries of the same message) cannot
interleave half-updates. Terminal states set the record's TTL to the result TTL
and publish the job id on `keys.EVENTS_CHANNEL` for long-waiting clients.

The scripts are plain text: the API registers them on its asyncio client, the
workers on their blocking one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Mapping

from shared import keys

# Lua: a job that ended and asked for a callback goes onto the callbacks stream (in the same
# script as its terminal write, so no ended job misses its callback).
_NOTIFY = f"""
local function notify(job_key, job_id)
  if redis.call('HEXISTS', job_key, 'callback_url') == 1 then
    redis.call('XADD', '{keys.CALLBACKS}', 'MAXLEN', '~', '1000000', '*', 'job', job_id)
  end
end
"""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})


class JobKind(StrEnum):
    FORECAST = "forecast"
    BACKTEST = "backtest"


class Lane(StrEnum):
    ASYNC = "async"
    SYNC = "sync"


# KEYS[1] job, KEYS[2] the owner's in-flight set, KEYS[3] the job's input list, KEYS[4] the model's
# set of queued jobs, KEYS[5] the job's items, KEYS[6] idempotency key (optional).
# ARGV: record ttl, in-flight cap (0: none), in-flight stale-before time, idempotency value, then
# field/value pairs of the record. The input list and items were written just before, in the same
# round trip; a refusal deletes them. Returns nil when the job was created; the idempotency key's
# value when that key was used before (nothing is kept); 'in-flight:<n>' when the owner already
# has `cap` jobs in flight.
CREATE = """
local function refuse(answer)
  redis.call('DEL', KEYS[3], KEYS[5])
  return answer
end
if KEYS[6] then
  local existing = redis.call('GET', KEYS[6])
  if existing then return refuse(existing) end
end
local cap = tonumber(ARGV[2])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
  local n = redis.call('ZCARD', KEYS[2])
  if n >= cap then return refuse('in-flight:' .. n) end
end
if KEYS[6] then redis.call('SET', KEYS[6], ARGV[4], 'EX', ARGV[1]) end
local created
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if ARGV[i] == 'created_at' then created = ARGV[i + 1] end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], created, redis.call('HGET', KEYS[1], 'id'))
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], created, redis.call('HGET', KEYS[1], 'id'))
return false
"""

# KEYS[1] job, KEYS[2] the cached output list, KEYS[3] the job's output list, KEYS[4] idempotency key
# (optional)  ARGV: record ttl, idempotency value, then field/value pairs of a record that is already
# terminal (answered from the result cache). Returns nil when created, or the idempotency key's value
# when that key was used before.
CREATE_DONE = (
    _NOTIFY
    + """
if KEYS[4] then
  local existing = redis.call('GET', KEYS[4])
  if existing then return existing end
  redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[1])
end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if redis.call('COPY', KEYS[2], KEYS[3], 'REPLACE') == 1 then redis.call('EXPIRE', KEYS[3], ARGV[1]) end
notify(KEYS[1], redis.call('HGET', KEYS[1], 'id'))
return false
"""
)

# KEYS[1] job, KEYS[2] the owner's in-flight set, KEYS[3] the model's queued set, KEYS[4] the
# job's input list, KEYS[5] its output list  ARGV: now, worker name, max deliveries, ttl, channel,
# job id. Returns the status afterwards; anything but 'running' tells the worker to drop the
# message (cancelled, finished, expired). A redelivered job starts over: its partial output is
# cleared. A job whose worker died `max deliveries` times while it was in a forward pass ends
# 'failed' instead of killing worker after worker.
START = (
    _NOTIFY
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return 'missing' end
if s == 'queued' or s == 'running' then
  redis.call('ZREM', KEYS[3], ARGV[6])
  -- A redelivery counts against the job only when its series were in a forward pass as its worker
  -- died (the worker sets 'in_pass' around each pass): a job that merely waited beside the one that
  -- killed the worker is never failed for it.
  local lost = tonumber(redis.call('HGET', KEYS[1], 'lost') or '0')
  if s == 'running' and redis.call('HGET', KEYS[1], 'in_pass') == '1' then
    lost = lost + 1
    redis.call('HSET', KEYS[1], 'lost', lost)
  end
  redis.call('HDEL', KEYS[1], 'in_pass')
  if lost >= tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error',
      'its worker was lost ' .. lost .. ' times while it was in a forward pass; not retried again')
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    redis.call('ZREM', KEYS[2], ARGV[6])
    redis.call('DEL', KEYS[4], KEYS[5])
    redis.call('PUBLISH', ARGV[5], ARGV[6])
    notify(KEYS[1], ARGV[6])
    return 'failed'
  end
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[2], 'progress_done', 0)
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('DEL', KEYS[5])
  return 'running'
end
return s
"""
)

# KEYS[1] job, KEYS[2] the owner's in-flight set, KEYS[3] the job's input list, KEYS[4] its output
# list, KEYS[5] its items  ARGV: final status, now, ttl, channel, job id, then field/value pairs.
# Only a running job can finish; the first terminal write wins, so a redelivered
# duplicate cannot overwrite a result. A pending cancel request turns success into
# 'cancelled' and its fields are not stored. Output and items live as long as the record.
FINISH = (
    _NOTIFY
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'running' then return s or 'missing' end
local final = ARGV[1]
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then final = 'cancelled' end
redis.call('HSET', KEYS[1], 'status', final, 'finished_at', ARGV[2])
if final ~= 'cancelled' then
  for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if final == 'succeeded' then
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[5], ARGV[3])
else
  redis.call('DEL', KEYS[4])
end
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
notify(KEYS[1], ARGV[5])
return final
"""
)

# KEYS[1] job, KEYS[2] the owner's in-flight set, KEYS[3] the job's input list, KEYS[4] its output list
# ARGV: now, ttl, channel, job id, owner.
# Returns 'cancelled' (was queued), 'cancelling' (running: stops at the next batch),
# the terminal status it already had, or 'missing' (also when another owner's job).
CANCEL = (
    _NOTIFY
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if not s or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[5] then return 'missing' end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[4])
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  notify(KEYS[1], ARGV[4])
  return 'cancelled'
end
if s == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return s
"""
)


# KEYS[1] job  ARGV: series done, channel, job id. Records a running job's progress and announces it
# (an ended or expired job is left alone).
PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'progress_done', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS[1] the owner's token bucket  ARGV: rate (tokens/s), burst.
# Takes one token; returns 0 when there was one, else the seconds until there will be (as text).
TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + (now - (tonumber(b[2]) or now)) * rate)
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


def new_record(
    job_id: str,
    model_id: str,
    n_series: int,
    prediction_length: int,
    lane: Lane,
    now: float,
    owner: str,
    kind: JobKind = JobKind.FORECAST,
    request: dict | None = None,
) -> dict:
    """Fields of a freshly accepted job, as stored in its hash (`n_series`: origins for a backtest;
    `request`: what the worker needs besides the series, such as the forecast parameters)."""
    return {
        "id": job_id,
        "kind": kind.value,
        "owner": owner,
        "model": model_id,
        "status": JobStatus.QUEUED.value,
        "lane": lane.value,
        "n_series": n_series,
        "prediction_length": prediction_length,
        "created_at": repr(now),
        "attempts": 0,
        "request": json.dumps(request or {}),
    }


def stored(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Record fields as a hash holds them: strings and numbers as they are, anything else as JSON."""
    return {
        name: value if isinstance(value, (str, int, float)) else json.dumps(value) for name, value in fields.items()
    }


def finish_args(
    status: JobStatus, now: float, ttl_s: int, channel: str, job_id: str, fields: Mapping[str, Any]
) -> list:
    """ARGV for FINISH, then the fields as stored."""
    return [status.value, repr(now), ttl_s, channel, job_id, *(x for pair in stored(fields).items() for x in pair)]


@dataclass
class JobRecord:
    """A job as read back from its hash."""

    id: str
    model: str
    status: JobStatus
    lane: Lane
    n_series: int
    prediction_length: int
    created_at: float
    owner: str = ""
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    inference_s: float | None = None
    worker: str | None = None
    weights: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    kind: JobKind = JobKind.FORECAST
    progress_done: int = 0
    cached: bool = False
    callback_url: str | None = None
    callback_status: str | None = None
    callback_attempts: int = 0
    callback_error: str | None = None
    request: dict = field(default_factory=dict, repr=False)
    # A backtest's scores (stored); a forecast's predictions are loaded from its output list on demand.
    backtest: dict | None = field(default=None, repr=False)
    predictions: list[dict] | None = field(default=None, repr=False)

    @classmethod
    def from_hash(cls, h: Mapping[str, str]) -> JobRecord:
        def num(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        return cls(
            id=h["id"],
            model=h["model"],
            status=JobStatus(h["status"]),
            lane=Lane(h.get("lane", Lane.ASYNC)),
            n_series=int(h.get("n_series", 0)),
            prediction_length=int(h.get("prediction_length", 0)),
            created_at=float(h["created_at"]),
            owner=h.get("owner", ""),
            attempts=int(h.get("attempts", 0)),
            started_at=num("started_at"),
            finished_at=num("finished_at"),
            inference_s=num("inference_s"),
            worker=h.get("worker"),
            weights=h.get("weights"),
            error=h.get("error"),
            cancel_requested=h.get("cancel_requested") == "1",
            kind=JobKind(h.get("kind", JobKind.FORECAST)),
            progress_done=int(h.get("progress_done", 0)),
            cached=h.get("cached") == "1",
            callback_url=h.get("callback_url"),
            callback_status=h.get("callback_status"),
            callback_attempts=int(h.get("callback_attempts", 0)),
            callback_error=h.get("callback_error") or None,
            request=json.loads(h["request"]) if h.get("request") else {},
            backtest=json.loads(h["backtest"]) if h.get("backtest") else None,
        )

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


class Scripts:
    """The transition scripts registered on one Redis client (blocking or asyncio: calls return
    a value or an awaitable accordingly)."""

    def __init__(self, client: Any):
        self.create = client.register_script(CREATE)
        self.create_done = client.register_script(CREATE_DONE)
        self.take_token = client.register_script(TAKE_TOKEN)
        self.start = client.register_script(START)
        self.finish = client.register_script(FINISH)
        self.cancel = client.register_script(CANCEL)
        self.progress = client.register_script(PROGRESS)
