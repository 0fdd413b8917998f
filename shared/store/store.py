"""The job store: every read and write of a job, its series and results, its owner's counters and
the model's worker list, as typed methods over Redis.

Each operation is written once, as a generator that yields the commands of one round trip (a
pipeline) and receives their replies (sans-IO, as h11 does for HTTP). `JobStore` runs them on a
blocking client (workers, tests), `AsyncJobStore` on an asyncio one (the API): the same method
returns the value, or an awaitable of it. Both clients must not decode replies: series and results
are binary, and text is decoded here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Concatenate, Generic, NamedTuple, ParamSpec, TypeVar, overload

import msgspec
import redis

from shared.catalog import ModelSpec
from shared.catalog import get as get_model
from shared.settings import Settings
from shared.store import keys, scripts
from shared.store.record import JobRecord, JobStatus, Lane, encode

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

SCRIPT = "script"
# Seconds the API waits for a pooled Redis connection (api/main.py), and for a round trip of its job
# store at most, that wait included (plus redis-py's own default socket timeout).
POOL_WAIT_S = 10.0
REDIS_TIMEOUT_S = POOL_WAIT_S + 5.0


class Cmd(NamedTuple):
    """One command of a round trip: a method of redis-py's client, or SCRIPT (name, keys, args)."""

    name: str
    args: tuple = ()
    kwargs: Mapping[str, Any] = MappingProxyType({})


class Atomic(list):
    """A round trip run as one MULTI/EXEC transaction."""


class Alone(list):
    """A round trip the API sends on its own, never in a pipeline with others' (`AsyncJobStore`): a
    blocking read, or a large body, would hold up every round trip gathered with it."""


Op = Generator[list[Cmd], list[Any], T]


def run_script(name: str, keys_: Sequence[str], args: Sequence[Any]) -> Cmd:
    return Cmd(SCRIPT, (name, list(keys_), list(args)))


class operation(Generic[P, T]):  # lower case: used as a decorator, like `property`
    """Turn a generator of round trips into a method that runs it on the store's client. Typed per
    driver: on a `JobStore` the method returns T, on an `AsyncJobStore` an awaitable of T."""

    def __init__(self, fn: Callable[Concatenate[Any, P], Op[T]]):
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]  # copies __doc__ and __name__ onto the descriptor

    @overload
    def __get__(self, store: AsyncJobStore, owner: type | None = None) -> Callable[P, Awaitable[T]]: ...
    @overload
    def __get__(self, store: JobStore, owner: type | None = None) -> Callable[P, T]: ...
    @overload
    def __get__(self, store: _Core, owner: type | None = None) -> Callable[P, Any]: ...

    def __get__(self, store: _Core, owner: type | None = None) -> Callable[P, Any]:
        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return store._drive(self.fn(store, *args, **kwargs))

        return method


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def live(heartbeats: dict, heartbeat_s: float, now: float | None = None) -> dict[str, dict]:
    """The workers heard from within three heartbeats, by name, from a model's heartbeat hash: the one
    liveness rule (the API counts them, the reaper gives a dead one's jobs back)."""
    now = time.time() if now is None else now
    infos = {_text(name): json.loads(info) for name, info in heartbeats.items()}
    return {name: info for name, info in infos.items() if now - info["last_seen"] < 3 * heartbeat_s}


class CircuitState(NamedTuple):
    """A model's circuit breaker as stored: `state` None (closed), 'open' or 'half_open'; `since`:
    when it opened, or when its current probes began."""

    state: str | None = None
    since: float = 0.0


class ModelState(NamedTuple):
    depth: int
    sync_depth: int
    live: list[dict]
    circuit: CircuitState


# What `finish` returns for a job a later delivery's claim took over (lua/start.lua): this run's
# outcome and results were not stored; the later run's will be.
SUPERSEDED = "superseded"


class Outcome(NamedTuple):
    """How a worker ends a job (`finish`): its status and the record fields stored with it; for a
    job its last pass completed, that pass's results, appended by the same script."""

    record: JobRecord
    status: JobStatus
    fields: dict
    digest: str | None = None  # the result cache entry a success is kept under (shared/cache.py)
    results: Sequence[bytes] = ()


class Appended(NamedTuple):
    """A pass's results of a job it did not finish (`append_results`)."""

    job_id: str
    attempt: int  # the claim's (JobRecord.attempts): a later claim's run supersedes this one's
    elements: list[bytes]  # none for work whose results the worker keeps alone (anomaly windows)
    first: int  # the job's first series in the pass: its `in_pass` mark, and where its results go
    done: int | None  # the job's series done so far, or None: its progress comes with its end


class PassRead(NamedTuple):
    cancel_requested: bool
    inputs: list[bytes] | None  # None when the pass did not ask for the job's series


class Claim(NamedTuple):
    """A job of a delivery, as its claim (`JobStore.start`) left it."""

    status: str  # 'running', or why the worker is to skip it (an end state, or 'missing')
    record: JobRecord | None
    # A sync job's series, read with its claim, which also marked it in a pass (`read_sync`,
    # lua/start.lua); None for any other job.
    inputs: list[bytes] | None = None


class _Core:
    def __init__(self, settings: Settings):
        self.settings = settings
        # A job's record, series and idempotency key live until its result would have expired.
        self.record_ttl_s = settings.result_ttl_s + settings.max_job_s

    def _drive(self, op: Op[Any]) -> Any:
        raise NotImplementedError

    # -- creating a job (API) -------------------------------------------------------------------

    @operation
    def create(
        self, spec: ModelSpec, record: JobRecord, inputs: list[bytes], items: bytes | None, max_in_flight: int,
        idempotency: tuple[str, str] | None = None, flight: str | None = None, cached: str | None = None,
        message: tuple[str, bytes] | None = None,
    ) -> Op[str | None]:  # fmt: skip
        """Record a queued job with its series (`inputs`, one element each) and items, in one round trip;
        with `message` (a queue and a Celery message of the job's own), the message is pushed onto the
        queue in the same script, once the job is created.

        Returns None when created. Otherwise nothing is kept, and the answer says why (lua/create.lua):
        the earlier value of the idempotency key (`idempotency`: the key's digest and the value to
        store), 'cached:<fields>' (the result cache holds an answer under the digest `cached`: the
        fields `cached` returns), 'joined:<id>' (the owner's identical request `flight`, a digest,
        is in flight as job <id>), 'queue-full:<n>' (MAX_QUEUE_DEPTH messages wait on the lane's
        queue) or 'in-flight:<n>' (the owner has `max_in_flight` jobs not yet finished)."""
        job_id, ttl = record.id, self.record_ttl_s
        step: list[Cmd] = Alone() if sum(map(len, inputs)) > _GATHERED_MAX_BYTES else []
        if items is not None:
            step.append(Cmd("set", (keys.job_items(job_id), items), {"ex": ttl}))
        # The series go to a list of their own, which the script renames to the job's once it records
        # the job. redis-py sends a whole round trip again when its connection drops before the
        # replies (the clients retry ConnectionError): the DEL makes the second sending write the
        # series once, and a job the first one created keeps its own list as it was (the script
        # drops the second's), where an RPUSH to the job's list would have doubled its series.
        staged = keys.job_input_staged(job_id)
        step.append(Cmd("delete", (staged,)))
        step += [Cmd("rpush", (staged, *chunk)) for chunk in _chunks(inputs)]
        step.append(Cmd("expire", (staged, ttl)))
        step.append(run_script(
            "create",
            [keys.job(job_id), keys.in_flight(record.owner), staged, keys.queued(spec),
             keys.job_items(job_id), keys.lane_queue(spec, record.lane),
             keys.idempotency(record.owner, idempotency[0]) if idempotency else "",
             keys.flight(record.owner, flight) if flight else "", keys.cache(cached) if cached else "",
             message[0] if message else "", keys.job_input(job_id)],
            [ttl, max_in_flight, repr(record.created_at - ttl), idempotency[1] if idempotency else "",
             self.settings.max_queue_depth, keys.job(""), message[1] if message else "", job_id,
             int(record.created_at), *_pairs(record)],
        ))  # fmt: skip
        return _text((yield step)[-1])

    @operation
    def create_done(
        self, record: JobRecord, cached: str, items: bytes | None, idempotency: tuple[str, str] | None = None
    ) -> Op[str | None]:
        """Record a job that is answered already, from the result cache entry `cached` (its digest);
        returns as `create` does."""
        job_id, ttl = record.id, self.settings.result_ttl_s
        step: list[Cmd] = []
        if items is not None:
            step.append(Cmd("set", (keys.job_items(job_id), items), {"ex": ttl}))
        idem_key = [keys.idempotency(record.owner, idempotency[0])] if idempotency else []
        step.append(run_script(
            "create_done",
            [keys.job(job_id), keys.in_flight(record.owner), keys.CALLBACKS, keys.cache_output(cached),
             keys.job_output(job_id), keys.job_items(job_id), *idem_key],
            [ttl, idempotency[1] if idempotency else "", repr(record.finished_at), keys.EVENTS_CHANNEL, job_id,
             *_pairs(record)],
        ))  # fmt: skip
        return _text((yield step)[-1])

    @operation
    def create_ensemble(self, record: JobRecord) -> Op[None]:
        """Record an ensemble's job (api/ensembles.py): its members are jobs of their own, so it is in
        no queue, no in-flight set, and never claimed; it lives as long as a job's record."""
        key = keys.job(record.id)
        yield Atomic([Cmd("hset", (key,), {"mapping": record.to_hash()}), Cmd("expire", (key, self.record_ttl_s))])

    @operation
    def fail_unsent(self, spec: ModelSpec, record: JobRecord, error: str, idempotency: str | None = None) -> Op[bool]:
        """End a queued job whose message could not be sent (lua/unsent.lua): failed, with `error`."""
        reply = yield [run_script(
            "unsent",
            [keys.job(record.id), keys.in_flight(record.owner), keys.queued(spec), keys.job_input(record.id),
             keys.job_items(record.id), keys.CALLBACKS,
             keys.idempotency(record.owner, idempotency) if idempotency else ""],
            [repr(time.time()), self.settings.result_ttl_s, keys.EVENTS_CHANNEL, record.id, error],
        )]  # fmt: skip
        return bool(reply[0])

    @operation
    def forget_idempotency(self, owner: str, digest: str) -> Op[None]:
        yield [Cmd("delete", (keys.idempotency(owner, digest),))]

    @operation
    def take_token(self, owner: str, rate_per_s: float, burst: int) -> Op[float]:
        """Take one submission token from the owner's bucket: 0, or the seconds until one is there."""
        reply = yield [run_script("take_token", [keys.rate_bucket(owner)], [rate_per_s, burst])]
        return float(reply[0])

    @operation
    def cached(self, digest: str) -> Op[dict | None]:
        """The stored fields of a cached result (shared/cache.py), if there is one."""
        found = (yield [Cmd("get", (keys.cache(digest),))])[0]
        return json.loads(found) if found else None

    # -- reading and cancelling (API) -----------------------------------------------------------

    @operation
    def get(
        self, job_id: str, with_results: bool = False, waiter: tuple[str, str] | None = None
    ) -> Op[JobRecord | None]:
        """The job's record; `with_results`: and, if it succeeded, its output elements and items
        (`JobRecord.results`) in the same round trip. `waiter` (with results): the owner who will wait
        for the job's end and its answers channel, where the answer then comes if the job is the
        owner's (lua/read.lua)."""
        if not with_results:
            fields = (yield [Cmd("hgetall", (keys.job(job_id),))])[0]
            return JobRecord.from_hash(fields) if fields else None
        job_keys = [keys.job(job_id), keys.job_output(job_id), keys.job_items(job_id)]
        flat, outputs, items = (yield [run_script("read", job_keys, list(waiter or ("", "")))])[0]
        return _record(flat, outputs, items)  # Lua's false comes back as None

    @operation
    def results(self, job_id: str) -> Op[tuple[list[bytes], bytes | None]]:
        """A succeeded job's output elements (one per series or origin) and its items."""
        outputs, items = yield [Cmd("lrange", (keys.job_output(job_id), 0, -1)), Cmd("get", (keys.job_items(job_id),))]
        return outputs, items

    @operation
    def cancel(self, job_id: str, owner: str) -> Op[str]:
        """'cancelled' (it was queued), 'cancelling' (running: it stops at its next pass), the terminal
        status it had already, or 'missing' (also for another owner's job)."""
        reply = yield [run_script(
            "cancel",
            [keys.job(job_id), keys.in_flight(owner), keys.job_input(job_id), keys.job_output(job_id), keys.CALLBACKS],
            [repr(time.time()), self.settings.result_ttl_s, keys.EVENTS_CHANNEL, job_id, owner],
        )]  # fmt: skip
        return _text(reply[0])

    # -- models and their workers ---------------------------------------------------------------

    @operation
    def models(self, specs: Iterable[ModelSpec]) -> Op[list[ModelState]]:
        """Each model's queue depths and live workers, in one round trip."""
        specs = list(specs)
        replies = yield [
            cmd
            for spec in specs
            for cmd in (Cmd("llen", (keys.queue(spec),)), Cmd("llen", (keys.sync_queue(spec),)),
                        Cmd("hgetall", (keys.workers(spec),)), _circuit_read(spec))
        ]  # fmt: skip
        return [
            ModelState(depth, sync_depth, list(live(beats, self.settings.heartbeat_s).values()), _circuit(circuit))
            for depth, sync_depth, beats, circuit in zip(*(replies[i::4] for i in range(4)), strict=True)
        ]

    @operation
    def live_workers(self, spec: ModelSpec, train: bool | None = False) -> Op[dict[str, dict]]:
        """The model's live workers' heartbeats, by worker name (`train`: its training workers; None:
        both kinds, which the reaper needs: any worker of a model gives back any dead one's jobs)."""
        kinds = (False, True) if train is None else (train,)
        replies = yield [Cmd("hgetall", (keys.workers(spec, kind),)) for kind in kinds]
        return {name: beat for beats in replies for name, beat in live(beats, self.settings.heartbeat_s).items()}

    @operation
    def health(self, spec: ModelSpec) -> Op[tuple[list[dict], CircuitState]]:
        """The model's live workers' heartbeats and its circuit, in one round trip (what routing a call needs)."""
        beats, circuit = yield [Cmd("hgetall", (keys.workers(spec),)), _circuit_read(spec)]
        return list(live(beats, self.settings.heartbeat_s).values()), _circuit(circuit)

    @operation
    def revisions(self, spec: ModelSpec) -> Op[tuple[dict[str, tuple[float, float]], list[dict]]]:
        """The weights revisions the model's workers served, revision -> (first seen, last seen), and
        the heartbeats of its live workers, in one round trip."""
        found, beats = yield [Cmd("hgetall", (keys.revisions(spec),)), Cmd("hgetall", (keys.workers(spec),))]
        seen: dict[str, list[float]] = {}
        for field, value in found.items():
            revision, _, which = _text(field).rpartition(":")
            seen.setdefault(revision, [0.0, 0.0])[which == "last"] = float(value)
        history = {revision: (first, last) for revision, (first, last) in seen.items()}
        return history, list(live(beats, self.settings.heartbeat_s).values())

    @operation
    def heartbeat(self, spec: ModelSpec, name: str, info: dict, train: bool = False) -> Op[None]:
        """List a worker under its model (entries age out when it stops: `live`)."""
        key, now = keys.workers(spec, train), time.time()
        step = Atomic([Cmd("hset", (key, name, json.dumps({**info, "last_seen": now}))),
                       Cmd("expire", (key, int(self.settings.heartbeat_s * 6) + 1))])  # fmt: skip
        if info.get("revision"):  # the model's history of weights revisions (GET /v1/models/{id}/versions)
            revision = info["revision"]
            step += [Cmd("hsetnx", (keys.revisions(spec), f"{revision}:first", repr(now))),
                     Cmd("hset", (keys.revisions(spec), f"{revision}:last", repr(now)))]  # fmt: skip
        yield step

    @operation
    def sign_off(self, spec: ModelSpec, name: str, train: bool = False) -> Op[None]:
        yield [Cmd("hdel", (keys.workers(spec, train), name))]

    # -- running a job (workers) ----------------------------------------------------------------

    @operation
    def start(self, spec: ModelSpec, job_ids: Sequence[str], worker: str, read_sync: int = 0) -> Op[list[Claim]]:
        """Claim the jobs of one delivery of a message: for each, its status afterwards ('running', or
        why it is to be skipped: an end state or 'missing') and its record as the claim left it. One
        command however many jobs the message carries. With `read_sync`, a sync job of at most that
        many series comes with its series, marked in a pass: the claiming worker runs it at once."""
        s = self.settings
        job_keys = [k for i in job_ids for k in (keys.job(i), keys.job_input(i), keys.job_output(i))]
        args = [repr(time.time()), worker, s.max_deliveries, s.result_ttl_s, keys.EVENTS_CHANNEL, keys.in_flight(""),
                read_sync]  # fmt: skip
        (replies,) = yield [run_script("start", [keys.queued(spec), keys.CALLBACKS, *job_keys], [*args, *job_ids])]
        claimed = []
        for state, fields, inputs in replies:
            record = JobRecord.from_hash(dict(zip(fields[::2], fields[1::2], strict=True))) if fields else None
            claimed.append(Claim(_text(state) if record else "missing", record, inputs or None))
        return claimed

    @operation
    def read_pass(self, slices: Sequence[tuple[str, int, int, bool, int]], mark: bool = False) -> Op[list[PassRead]]:
        """For each (job id, first, end, wanted, the claim's attempt) of a forward pass: whether a
        cancel is pending, and the job's series first..end-1 when `wanted`; with `mark`,
        `mark_in_pass` in the same command."""
        job_keys = [k for job_id, *_ in slices for k in (keys.job(job_id), keys.job_input(job_id))]
        # Not wanted: first..first-1, nothing, the first still there for the mark.
        args = [x for _, start, end, wanted, attempt in slices
                for x in (start, end - 1 if wanted else start - 1, attempt)]  # fmt: skip
        (replies,) = yield [run_script("read_pass", job_keys, [int(mark), *args])]
        return [
            PassRead(cancel == b"1", inputs if wanted else None)
            for (cancel, inputs), (*_, wanted, _) in zip(replies, slices, strict=True)
        ]

    @operation
    def mark_in_pass(self, jobs: Iterable[tuple[str, int, int]]) -> Op[None]:
        """For each (job id, the claim's attempt, its first series in the pass): from here on a death
        of this worker counts against the job (lua/start.lua), while that claim holds it."""
        jobs = list(jobs)
        job_keys = [k for i, _, _ in jobs for k in (keys.job(i), keys.job_input(i))]
        marks = [x for _, attempt, first in jobs for x in (first, attempt)]
        yield [run_script("read_pass", job_keys, ["mark", *marks])]

    @operation
    def append_results(self, results: Sequence[Appended]) -> Op[None]:
        """For each job: append its results, clear its in-pass mark, and record its progress when not
        yet done; nothing for a job its claim no longer holds (lua/append.lua)."""
        yield self._append(results)

    @operation
    def complete_pass(self, results: Sequence[Appended], outcomes: Sequence[Outcome]) -> Op[list[str]]:
        """`append_results` for the jobs a pass left running, then `finish` for those it completed (their
        last results in `Outcome.results`), in one round trip (a worker's pass I/O thread,
        workers/executor.py); returns the final statuses."""
        before = self._append(results)
        replies = yield before + self._finish(outcomes)
        return _finals(replies, outcomes)

    def _append(self, results: Sequence[Appended]) -> list[Cmd]:
        step = []
        for job_id, attempt, elements, first, done in results:
            # None for work whose results the worker keeps alone (anomaly windows): the mark and the
            # progress still go.
            chunks = _chunks(elements) or [[]]
            at = first  # where each chunk's results go in the output list
            for i, chunk in enumerate(chunks):
                last = i == len(chunks) - 1
                head = [attempt, self.settings.result_ttl_s, int(last), "" if done is None else done,
                        keys.EVENTS_CHANNEL, job_id, first, at]  # fmt: skip
                step.append(run_script("append", [keys.job(job_id), keys.job_output(job_id)], [*head, *chunk]))
                at += len(chunk)
        return step

    @operation
    def inputs(self, job_id: str) -> Op[list[bytes]]:
        """All of a job's stored series (a backtest's one, an anomaly job's), read at once: the worker
        cuts its forecast windows from them."""
        return (yield [Cmd("lrange", (keys.job_input(job_id), 0, -1))])[0]

    @operation
    def finish(self, outcomes: Sequence[Outcome | tuple[JobRecord, JobStatus, dict]]) -> Op[list[str]]:
        """Store the outcome (status and record fields) of each job, and keep a success with a digest
        in the result cache; returns their final statuses (a pending cancel makes a success
        'cancelled'; a job that is not running keeps what it has, and gets no more results).

        The jobs are announced together, their ids in one message after every script has run: an
        API process parses one message per wave of jobs, not one per job. Each script has published
        before it the answers of its awaited jobs (`answers`). Should a message be lost
        (the connection drops between the scripts and it), waiters find the jobs ended at their next
        re-read (api/events.py): a wake-up can be late, never wrong."""
        if not outcomes:
            return []
        return _finals((yield self._finish(outcomes)), outcomes)

    def _finish(self, outcomes: Sequence[Outcome | tuple[JobRecord, JobStatus, dict]]) -> list[Cmd]:
        """The finish scripts of `outcomes` (`_scripts`: one per model, or more when their results
        are many), then their one announcement (none without outcomes)."""
        if not outcomes:
            return []
        now, s = time.time(), self.settings
        ended = [Outcome(*o) for o in outcomes]
        head = [
            repr(now), s.result_ttl_s,
            s.breaker_min_jobs, s.breaker_failure_ratio, math.ceil(s.breaker_window_s * (1 + 1 / _BUCKETS)) + 1,
            s.cache_ttl_s,
        ]  # fmt: skip
        step = []
        for model, group in _scripts(ended):
            breaker = self._breaker_keys(model, now)
            job_keys, args = [], [*head, len(breaker) - 1, ANSWER_MAX_RESULTS, ANSWER_MAX_BYTES]
            for r, status, fields, digest, results in (ended[i] for i in group):
                cache, entry = ["", ""], ""
                if digest is not None and status == JobStatus.SUCCEEDED and s.cache_ttl_s > 0:
                    cache = [keys.cache_output(digest), keys.cache(digest)]
                    entry = json.dumps({name: fields[name] for name in _CACHED_FIELDS if name in fields})
                pairs = [x for pair in encode(fields).items() for x in pair]
                job_keys += [keys.job(r.id), keys.in_flight(r.owner), keys.job_input(r.id), keys.job_output(r.id),
                             keys.job_items(r.id), *cache]  # fmt: skip
                args += [status.value, r.id, r.attempts, entry, len(results), *results, len(pairs), *pairs]
            step.append(run_script("finish", [keys.CALLBACKS, *breaker, *job_keys], args))
        return [*step, Cmd("publish", (keys.EVENTS_CHANNEL, " ".join(o.record.id for o in ended)))]

    def _breaker_keys(self, model: str, now: float) -> list[str]:
        """A model's circuit and the outcome buckets of the breaker's window, the current one first."""
        spec = get_model(model)
        bucket = int(now // (self.settings.breaker_window_s / _BUCKETS))
        return [keys.circuit(spec), *(keys.outcomes(spec, bucket - i) for i in range(_BUCKETS + 1))]

    @operation
    def probe(self, spec: ModelSpec) -> Op[bool]:
        """Whether a call may go to a model whose circuit is not closed (lua/probe.lua)."""
        s = self.settings
        reply = yield [run_script("probe", [keys.circuit(spec)], [repr(time.time()), s.breaker_cooloff_s,
                                                                  s.breaker_probes])]  # fmt: skip
        return bool(reply[0])

    # -- messages lost with a worker (workers/reaper.py) ----------------------------------------

    @operation
    def unacked(self, handed_out_before: float) -> Op[dict[str, str]]:
        """kombu's messages handed to a worker before `handed_out_before` (a time) and not acked:
        delivery tag -> message (JSON). Not all of them: under load the hash holds every message
        of every worker, which each worker's reaper read (and parsed) at each heartbeat."""
        tags = (yield [Cmd("zrangebyscore", (keys.KOMBU_UNACKED_INDEX, "-inf", handed_out_before))])[0]
        if not tags:
            return {}
        messages = (yield [Cmd("hmget", (keys.KOMBU_UNACKED, *tags))])[0]
        return {_text(tag): _text(message) for tag, message in zip(tags, messages, strict=True) if message is not None}

    @operation
    def holders(self, held: Sequence[tuple[str, str]]) -> Op[list[tuple[str | None, str | None, float | None]]]:
        """For each (delivery tag, job id): the job's status and worker, and when kombu handed the message out."""
        step = []
        for tag, job_id in held:
            step += [
                Cmd("hmget", (keys.job(job_id), "status", "worker")),
                Cmd("zscore", (keys.KOMBU_UNACKED_INDEX, tag)),
            ]
        replies = yield step
        return [
            (_text(status), _text(worker), handed_out)
            for (status, worker), handed_out in zip(replies[::2], replies[1::2], strict=True)
        ]

    @operation
    def sweep(self, spec: ModelSpec, grace_s: float, limit: int = 200) -> Op[list[str]]:
        """The model's jobs queued longer than `grace_s`, if this worker holds the sweep for the next
        `grace_s` (one worker of a model sweeps at a time)."""
        locked = (yield [Cmd("set", (keys.sweep_lock(spec), "1"), {"nx": True, "ex": max(1, int(grace_s))})])[0]
        if not locked:
            return []
        stale = (
            yield [Cmd("zrangebyscore", (keys.queued(spec), "-inf", time.time() - grace_s), {"start": 0, "num": limit})]
        )[0]
        return [_text(job_id) for job_id in stale]

    @operation
    def waiting_messages(self, spec: ModelSpec, at_most: int) -> Op[list[str] | None]:
        """Every message on the model's queues (those of its pinned revisions included) and in kombu's
        unacked hash; None when more than `at_most` wait in the queues (reading them all would cost
        more than it is worth)."""
        queues = keys.model_queues(spec)
        *lengths, revisions = yield [*(Cmd("llen", (q,)) for q in queues), Cmd("hkeys", (keys.revisions(spec),))]
        if sum(lengths) > at_most:
            return None
        pinned = {keys.revision_queue(spec, _text(field).rpartition(":")[0]) for field in revisions}
        replies = yield [*(Cmd("lrange", (q, 0, -1)) for q in (*queues, *sorted(pinned))),
                         Cmd("hvals", (keys.KOMBU_UNACKED,))]  # fmt: skip
        return [_text(m) for messages in replies for m in messages]

    @operation
    def queued_state(self, spec: ModelSpec, job_id: str) -> Op[tuple[JobStatus | None, Lane, str | None]]:
        """A queued job's status, lane and the queue its message goes to when it is not its lane's (a
        pinned weights revision's); a job claimed, ended or expired meanwhile leaves the queued set."""
        (status, lane, request), has_input = yield [Cmd("hmget", (keys.job(job_id), "status", "lane", "request")),
                                                    Cmd("exists", (keys.job_input(job_id),))]  # fmt: skip
        if _text(status) != JobStatus.QUEUED or not has_input:
            yield [Cmd("zrem", (keys.queued(spec), job_id))]
            return None, Lane.ASYNC, None
        pinned = json.loads(request or "{}").get("parameters", {}).get("weights_revision")
        return JobStatus.QUEUED, Lane(_text(lane) or Lane.ASYNC), keys.revision_queue(spec, pinned) if pinned else None

    @operation
    def resent(self, spec: ModelSpec, job_id: str) -> Op[None]:
        """A queued job's message was sent again: another grace period before looking again."""
        yield [Cmd("zadd", (keys.queued(spec), {job_id: int(time.time())}))]  # whole seconds: lua/create.lua

    # -- fine-tuning (workers/training.py) and fine-tuned models --------------------------------

    @operation
    def training_step(self, job_id: str, attempt: int, step: int, finetune: dict) -> Op[bool]:
        """Record a running fine-tuning job's step and training record and announce it; returns
        whether training is to stop: a cancel was requested, or the run's claim (`attempt`) no
        longer holds the job (a later delivery's runs it, or it ended)."""
        recorded, cancel = (yield [
            run_script("progress", [keys.job(job_id)],
                       [step, keys.EVENTS_CHANNEL, job_id, attempt, "finetune", json.dumps(finetune)]),
            Cmd("hget", (keys.job(job_id), "cancel_requested")),
        ])  # fmt: skip
        return not recorded or _text(cancel) == "1"

    @operation
    def holds(self, job_id: str, attempt: int) -> Op[bool]:
        """Whether the claim of this attempt still holds the running job (lua/append.lua)."""
        status, attempts = (yield [Cmd("hmget", (keys.job(job_id), "status", "attempts"))])[0]
        return _text(status) == JobStatus.RUNNING and _text(attempts) == str(attempt)

    @operation
    def register_finetuned(self, name: str, manifest: dict, job_id: str, attempt: int) -> Op[bool]:
        """List a fine-tuned model, if the claim of this attempt still holds the job that made it
        (lua/register.lua); returns whether it was listed."""
        registered = (yield [run_script("register", [keys.job(job_id), keys.FINETUNED],
                                        [attempt, name, json.dumps(manifest)])])[0]  # fmt: skip
        return bool(registered)

    @operation
    def finetuned(self, name: str | None = None) -> Op[dict[str, dict]]:
        """The fine-tuned models' manifests by id (only `name`'s, when given and registered)."""
        if name is not None:
            raw = (yield [Cmd("hget", (keys.FINETUNED, name))])[0]
            return {name: json.loads(raw)} if raw else {}
        return {_text(k): json.loads(v) for k, v in (yield [Cmd("hgetall", (keys.FINETUNED,))])[0].items()}

    @operation
    def forget_finetuned(self, name: str) -> Op[None]:
        yield [Cmd("hdel", (keys.FINETUNED, name))]

    # -- callbacks (api/callbacks.py) -----------------------------------------------------------

    @operation
    def callback_secret(self, candidate: str) -> Op[str]:
        """The master secret all API processes share: the first one stored wins."""
        _, secret = yield [
            Cmd("set", (keys.CALLBACK_MASTER, candidate), {"nx": True}),
            Cmd("get", (keys.CALLBACK_MASTER,)),
        ]
        return _text(secret)

    @operation
    def callback_entries(self, consumer: str, count: int, idle_ms: int, block_ms: int) -> Op[list[tuple[str, str]]]:
        """Callbacks to deliver, as (stream entry id, job id): retries that are due (moved back onto the
        stream), entries another consumer held for `idle_ms` without acking, then new ones (waiting
        up to `block_ms` for some)."""
        try:
            yield [Cmd("xgroup_create", (keys.CALLBACKS, keys.CALLBACK_GROUP), {"id": "0", "mkstream": True})]
        except redis.ResponseError:  # BUSYGROUP: it exists already
            pass
        reply = yield [
            run_script("promote_callbacks", [keys.CALLBACK_RETRIES, keys.CALLBACKS], [time.time()]),
            Cmd("xautoclaim", (keys.CALLBACKS, keys.CALLBACK_GROUP, consumer, idle_ms, "0-0"), {"count": count}),
        ]
        stale = reply[1][1]
        fresh = (yield Alone([Cmd("xreadgroup", (keys.CALLBACK_GROUP, consumer, {keys.CALLBACKS: ">"}),
                                  {"count": count, "block": block_ms})]))[0]  # fmt: skip
        entries = [*stale, *(entry for _, listed in fresh or [] for entry in listed)]
        return [(_text(entry_id), _text(fields.get(b"job", b""))) for entry_id, fields in entries]

    @operation
    def callback_done(self, entry_id: str, job_id: str, update: dict, retry_at: float | None = None) -> Op[None]:
        """Record a delivery attempt's outcome on the job (`update`: callback fields), schedule another
        at `retry_at`, and ack the stream entry."""
        step: list[Cmd] = Atomic()
        if update:
            step.append(Cmd("hset", (keys.job(job_id),), {"mapping": encode(update)}))
        if retry_at is not None:
            step.append(Cmd("zadd", (keys.CALLBACK_RETRIES, {job_id: retry_at})))
        step.append(Cmd("xack", (keys.CALLBACKS, keys.CALLBACK_GROUP, entry_id)))
        yield step


class JobStore(_Core):
    """The job store on a blocking client (workers, the reaper, tests).

    With `patience_s`, a round trip is retried while Redis is unreachable, so that a Redis restart
    never strands a finished job; past the patience the error propagates (a worker's task then
    fails without an ack, and Redis delivers its message again later).
    """

    def __init__(self, client: redis.Redis, settings: Settings, patience_s: float = 0.0):
        super().__init__(settings)
        self.client, self.patience_s = client, patience_s
        self._scripts = scripts.register(client)

    def _drive(self, op: Op[Any]) -> Any:
        try:
            step = next(op)
            while True:
                step = _resume(op, self._outlasting(step))
        except StopIteration as done:
            return done.value

    def _outlasting(self, step: list[Cmd]) -> list[Any] | redis.ResponseError:
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                return self._execute(step)
            except redis.ResponseError as exc:  # Redis's answer: the operation decides
                return exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("Redis unreachable (%s); retrying", exc)
                time.sleep(0.5)

    def _execute(self, step: list[Cmd]) -> list[Any]:
        if len(step) == 1 and not isinstance(step, Atomic):  # one command: no pipeline
            cmd = step[0]
            if cmd.name == SCRIPT:
                name, keys_, args = cmd.args
                return [self._scripts[name](keys=keys_, args=args)]  # loads the script when Redis lacks it
            return [getattr(self.client, cmd.name)(*cmd.args, **cmd.kwargs)]
        replies = self._pipeline(step, isinstance(step, Atomic))
        missing = _scripts_missing(step, replies)
        if missing:
            for script in self._scripts.values():
                self.client.script_load(script.script)
            for i, reply in zip(missing, self._pipeline([step[i] for i in missing], False), strict=True):
                replies[i] = reply
        return _raise_first(replies)

    def _pipeline(self, step: list[Cmd], atomic: bool) -> list[Any]:
        with self.client.pipeline(transaction=atomic) as pipe:
            for cmd in step:
                name, args, kwargs = _command(cmd, self._scripts)
                getattr(pipe, name)(*args, **kwargs)
            return pipe.execute(raise_on_error=False)


class AsyncJobStore(_Core):
    """The job store on an asyncio client (the API): each method returns an awaitable.

    The round trips that requests start in one turn of the event loop travel together, one pipeline
    for all (`_gathered`): under a flood, many requests reach their *create* or their read in the
    same turn, and a round trip's fixed cost (a pooled connection, redis-py's pipeline, a write and a
    read on both sides) is paid once for them. A round trip started alone waits for nothing: it is
    sent at the next turn. A transaction, a blocking read or a large body goes alone (`Alone`)."""

    def __init__(self, client: Any, settings: Settings):
        super().__init__(settings)
        self.client = client
        self._scripts = scripts.register(client)
        self._gathering: list[tuple[list[Cmd], asyncio.Future]] | None = None
        self._sending: set[asyncio.Task] = set()

    async def _drive(self, op: Op[Any]) -> Any:
        try:
            step = next(op)
            while True:
                step = _resume(op, await self._attempt(step))
        except StopIteration as done:
            return done.value

    async def _attempt(self, step: list[Cmd]) -> list[Any] | redis.ResponseError:
        try:
            if isinstance(step, Atomic | Alone):
                return _raise_first(await bounded(self._execute(step)))
            return _raise_first(await self._gathered(step))
        except redis.ResponseError as exc:  # Redis's answer: the operation decides
            return exc

    async def _gathered(self, step: list[Cmd]) -> list[Any]:
        """The replies to `step`, sent in one pipeline with the other round trips started in this turn."""
        loop = asyncio.get_running_loop()
        if self._gathering is None:
            gathering: list[tuple[list[Cmd], asyncio.Future]] = []
            self._gathering = gathering
            sending = loop.create_task(self._send_gathered(gathering))  # its first step runs at the next turn
            self._sending.add(sending)  # held, so the loop does not drop it mid-send
            sending.add_done_callback(functools.partial(self._sent, gathering))
        reply = loop.create_future()
        self._gathering.append((step, reply))
        return await reply  # a caller that goes away cancels only its own reply

    async def _send_gathered(self, gathering: list[tuple[list[Cmd], asyncio.Future]]) -> None:
        if self._gathering is gathering:  # round trips started from here on go in the next pipeline
            self._gathering = None
        wanted = [(step, reply) for step, reply in gathering if not reply.done()]  # not those gone already
        if not wanted:
            return
        try:
            replies = await bounded(self._execute([cmd for step, _ in wanted for cmd in step]))
        except Exception as exc:  # each caller gets what ended the round trip
            for _, reply in wanted:
                if not reply.done():
                    reply.set_exception(exc)
            return
        at = 0
        for step, reply in wanted:
            if not reply.done():
                reply.set_result(replies[at : at + len(step)])
            at += len(step)

    def _sent(self, gathering: list[tuple[list[Cmd], asyncio.Future]], sending: asyncio.Task) -> None:
        """Whatever ended the send (a shutdown may cancel it before it starts), no caller waits on."""
        self._sending.discard(sending)
        if self._gathering is gathering:
            self._gathering = None
        for _, reply in gathering:
            reply.cancel()  # a no-op for a reply already given

    async def _execute(self, step: list[Cmd]) -> list[Any]:
        """The replies to `step`, errors among them (ResponseError, for one command)."""
        replies = await self._pipeline(step, isinstance(step, Atomic))
        missing = _scripts_missing(step, replies)
        if missing:
            for script in self._scripts.values():
                await self.client.script_load(script.script)
            for i, reply in zip(missing, await self._pipeline([step[i] for i in missing], False), strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, step: list[Cmd], atomic: bool) -> list[Any]:
        async with self.client.pipeline(transaction=atomic) as pipe:
            for cmd in step:
                name, args, kwargs = _command(cmd, self._scripts)
                getattr(pipe, name)(*args, **kwargs)
            return await pipe.execute(raise_on_error=False)


async def bounded(call: Awaitable[T]) -> T:
    """`call`, a round trip on the API's client, which sets no socket timeout (api/main.py), given up
    after REDIS_TIMEOUT_S with what redis-py raises for a timeout (a cancelled read drops its
    connection)."""
    bound = asyncio.timeout(REDIS_TIMEOUT_S)
    try:
        async with bound:
            return await call
    except TimeoutError:
        if not bound.expired():
            raise
        raise redis.TimeoutError(f"Redis did not answer within {REDIS_TIMEOUT_S:g}s") from None


def _resume(op: Op[Any], outcome: list[Any] | redis.ResponseError) -> list[Cmd]:
    """The operation's next round trip, given the replies of the last one or the error Redis answered
    (an operation may expect one, e.g. BUSYGROUP); raises StopIteration with its result when it is done."""
    return op.throw(outcome) if isinstance(outcome, redis.ResponseError) else op.send(outcome)


def _command(cmd: Cmd, registered: dict[str, Any]) -> tuple[str, tuple, Mapping[str, Any]]:
    """A command as a pipeline method call. Scripts go as EVALSHA: redis-py's own pipelined scripts
    cost a SCRIPT EXISTS round trip on every execute; a script Redis lacks is loaded on NOSCRIPT."""
    if cmd.name != SCRIPT:
        return cmd.name, cmd.args, cmd.kwargs
    name, keys_, args = cmd.args
    return "evalsha", (registered[name].sha, len(keys_), *keys_, *args), {}


def _scripts_missing(step: list[Cmd], replies: list[Any]) -> list[int]:
    """Where a pipeline's scripts failed for want of being loaded (Redis restarted or flushed them). All
    of its scripts fail then and nothing else does, so running those again completes the round trip."""
    return [i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]


def _raise_first(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


# Buckets of the breaker's window: outcomes age out of it a sixth of the window at a time.
_BUCKETS = 6
# Bytes of series or results after which a round trip starts another command, so none grows with
# the job (one job's results of one pass travel in one command, whatever their size).
_CHUNK = 8 << 20
# Series past this many bytes go to Redis in a round trip of their own (`Alone`), not gathered.
_GATHERED_MAX_BYTES = 64 << 10
# The record fields a result cache entry keeps: what a hit's record reuses (shared/cache.py).
_CACHED_FIELDS = ("weights", "backtest", "progress_done")
# An awaited job (`JobRecord.awaited`) of at most this many results (one per series or origin) and
# bytes of them is answered on its waiter's channel (lua/finish.lua); a larger one's waiter reads
# its answer (Redis drops a subscriber whose output buffer outgrows its pub/sub limit, 32 MiB by
# default).
ANSWER_MAX_RESULTS = 16
ANSWER_MAX_BYTES = 64 << 10
# One message of an answers channel (keys.answers_channel): for each job, its id, its record as HGETALL gives it, its
# output list or false, its items or false. The ids are decoded at once, the rest only for a job
# someone waits on (`answered`). Lua's cmsgpack writes every string as msgpack text, which msgspec
# decodes as text only: outputs and items, which are binary, are taken raw and unwrapped (`_unwrapped`).
_ANSWERS = msgspec.msgpack.Decoder(list[tuple[str, msgspec.Raw, msgspec.Raw, msgspec.Raw]])
_RECORD = msgspec.msgpack.Decoder(list[str])
_OUTPUTS = msgspec.msgpack.Decoder(list[msgspec.Raw] | bool)
# The length of a msgpack string's header, by its first byte past the fixed ones (str 8/16/32, bin 8/16/32).
_HEADERS = {0xD9: 2, 0xDA: 3, 0xDB: 5, 0xC4: 2, 0xC5: 3, 0xC6: 5}
_FALSE = (b"\xc2", b"\xc0")  # false (Lua's "no such value"), nil


def answers(message: bytes) -> list[tuple[str, Any, Any, Any]]:
    """The answers one message of an answers channel carries: (job id, ...) each, whose record
    `answered` makes (only for a job someone still waits on)."""
    return _ANSWERS.decode(message)


def answered(answer: tuple[str, Any, Any, Any]) -> JobRecord | None:
    """The record, with its results when it succeeded, of one of `answers`."""
    _, record, results, items = answer
    outputs = _OUTPUTS.decode(results)
    return _record(
        _RECORD.decode(record),
        None if isinstance(outputs, bool) else [_unwrapped(o) for o in outputs],
        None if bytes(items) in _FALSE else _unwrapped(items),
    )


def _unwrapped(raw: msgspec.Raw) -> bytes:
    """A msgpack string's bytes."""
    data = bytes(raw)
    return data[1:] if 0xA0 <= data[0] <= 0xBF else data[_HEADERS[data[0]] :]


def _record(flat: list, outputs: list[bytes] | None, items: bytes | None) -> JobRecord | None:
    """A record read with its answer (lua/answer.lua): None when there is none; its results when it succeeded."""
    if not flat:
        return None
    record = JobRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))
    if outputs is not None:
        record.results = (outputs, items)
    return record


def _scripts(outcomes: list[Outcome]) -> list[tuple[str, list[int]]]:
    """Which outcomes each finish script ends, by index: those of one model together, in order, a
    new script once the results it carries pass `_CHUNK` bytes (so no command grows with the pass;
    one job's results always travel with its own end, never ahead of it)."""
    groups: list[tuple[str, list[int]]] = []
    open_: dict[str, tuple[list[int], int]] = {}
    for i, outcome in enumerate(outcomes):
        model, size = outcome.record.model, sum(map(len, outcome.results))
        group, carried = open_.get(model, (None, 0))
        if group is None or carried + size > _CHUNK:
            group, carried = [], 0
            groups.append((model, group))
        group.append(i)
        open_[model] = (group, carried + size)
    return groups


def _finals(replies: list[Any], outcomes: Sequence[Outcome | tuple[JobRecord, JobStatus, dict]]) -> list[str]:
    """The final statuses of the jobs a round trip finished (`JobStore._finish`), in their order:
    the replies of its finish scripts, which come last but for the announcement."""
    if not outcomes:
        return []
    groups = _scripts([Outcome(*o) for o in outcomes])
    finals: list[str] = [""] * len(outcomes)
    for (_, group), reply in zip(groups, replies[-1 - len(groups) : -1], strict=True):
        for i, final in zip(group, reply, strict=True):
            finals[i] = _text(final)
    return finals


def _circuit_read(spec: ModelSpec) -> Cmd:
    return Cmd("hmget", (keys.circuit(spec), "state", "opened_at"))


def _circuit(reply: list) -> CircuitState:
    state, since = reply
    return CircuitState(_text(state), float(since)) if state else CircuitState()


def _pairs(record: JobRecord) -> list:
    return [x for pair in record.to_hash().items() for x in pair]


def _chunks(elements: list[bytes], budget: int = _CHUNK) -> list[list[bytes]]:
    """Elements in groups of about `budget` bytes: one RPUSH each, so no command grows with the job."""
    out: list[list[bytes]] = [[]]
    size = 0
    for element in elements:
        if size + len(element) > budget and out[-1]:
            out.append([])
            size = 0
        out[-1].append(element)
        size += len(element)
    return [chunk for chunk in out if chunk]
