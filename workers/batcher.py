"""Dynamic batching across jobs: every job a worker holds feeds one model, through its model threads.

A worker runs Celery's threads pool with many slots (`WORKER_SLOTS`). Each task thread claims
its job, hands the job's series to the `Batcher` as one `Work`, and waits; the batcher's model
thread runs one forward pass after another, each over series of as many async jobs as fit
(`max_batch`), and its sync thread does the same for sync-lane work, beside it. Results are split
back to their jobs, and each job's outcome is stored before its task thread returns, so its
message is acked after the result is stored.

Which series share a forward pass:
- Only compatible ones: jobs with the same `Work.key`, which the model family's adapter gives
  (`group_key` in shared/families.py). The pass runs the longest horizon and the union of
  quantile levels of its jobs, and each job gets its own slice; the key keeps apart whatever
  would make a slice differ from the job's result alone.
- Sync-lane work has a model thread of its own, which never waits behind the async lane's queue
  or its reads and writes. A pass is stateless in torch, so on a CPU the two threads run the one
  model at once (a T5 pass holds the runtime's random generator, workers/runtime.py): a
  /v1/predict waits for no async pass. Sync work that finds the async thread idle runs on it
  instead, on all the intra-op threads (the sync thread's passes use one: `_idle`). On a GPU the
  passes take turns on the device, so there a sync pass waits for the async pass in progress;
  while sync requests keep coming (within `sync_guard_s` of the last), passes of async work are
  kept short (`sync_guard_batch`), so that it is a short one.
- Several async threads (ASYNC_THREADS): each runs passes of its own, and a job is held by one at
  a time (`Work.owner`), so its results are stored in order. On a CPU they split the cores
  (workers/runtime.py): two passes of one intra-op thread each keep two cores busier under a
  flood than one of two, whose threads wait for each other after every operation while another
  process holds a core (docs/operations.md, Scale). Only the first takes jobs larger than a pass,
  and it runs on every core while the others have none under way: a bulk job keeps the CPU.
- Fair across jobs: each pass serves the group of the job that has waited longest and shares its
  room max-min among that group's jobs, so a small job waits about one pass behind any backlog.

No batching timer by default: while a pass runs, newly arrived jobs pile up and the next pass
takes them together, so an idle worker answers a lone request at once. `BATCH_WAIT_MS` adds a
wait for more work when a batch is not full.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shared.schemas import ForecastParameters
from shared.series import Decoded
from shared.store import Lane

from workers import metrics
from workers.runtime import ModelRuntime

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Work:
    """One job's series on their way through the model. The series are read pass by pass from the
    job's input list in Redis (`inputs` None), or held here (a backtest's or anomaly job's windows, a
    sync job's series read with its claim);
    results go to the job's output list pass by pass unless not `stored`, and are also kept here
    when `keep` (a backtest scores them; an anomaly job's are only kept, and scored into its results)."""

    job_id: str
    n: int  # series in the job
    params: ForecastParameters
    lane: Lane
    key: tuple  # jobs share a pass only with equal keys (the family's `group_key`, and `variant`)
    inputs: list[Decoded] | None = None
    marked: bool = False  # its claim marked it in a pass (a sync job, workers/executor.py): its first pass needs none
    keep: bool = False
    stored: bool = True
    variant: str | None = None  # the fine-tuned model of the worker's base model the job asked for
    # Its claim's attempt (JobRecord.attempts): results are stored only while that claim holds the
    # job; a later delivery's claim restarts it (lua/start.lua) and supersedes this run (lua/append.lua).
    attempt: int = 0
    # How the job's record is finished together with its last pass's results, on the I/O thread (set
    # by workers/executor.py for a job that needs nothing more once its series are forecast), and the
    # status that left it; None: the job's task thread finishes it.
    closing: Any = None
    final: str | None = None
    ending: bool = False  # one of the I/O thread and the task thread has taken the job's end (`end_once`)
    kept: list[np.ndarray] = field(default_factory=list)
    scheduled: int = 0  # series handed to a forward pass so far
    # A sync-lane slice of it is in a pass. Either model thread may run sync work (`Batcher._idle`);
    # a job's slices run one after another all the same, so its results are stored in order.
    running: bool = False
    # The async model thread (its ident) that holds the job's next slices, with several
    # (ASYNC_THREADS): a job's slices run on one thread at a time, so they are stored in order.
    owner: int | None = None
    waiting_since: float = field(default_factory=time.monotonic)  # submitted, or last given a share of a pass
    done: int = 0
    model_s: float = 0.0  # time in the forward passes this job took part in
    error: str | None = None
    cancelled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def unscheduled(self) -> int:
        return self.n - self.scheduled

    def end_once(self) -> bool:
        """True for the first caller only: the job's end is stored by exactly one thread (the pass I/O
        thread finishing it with its last results, or its task thread failing it on a timeout)."""
        with _ENDING:
            taken, self.ending = self.ending, True
        return not taken


_ENDING = threading.Lock()


Slice = tuple[Work, int, int]  # a job's series [start, end) in one forward pass


class PassIO(Protocol):
    """Where a pass's series come from and its results go (workers/executor.py: Redis, pipelined)."""

    def read(self, batch: list[Slice], begin: bool = False) -> tuple[list[Decoded], dict[str, str | None]]:
        """The batch's series in order, and the jobs not to run, by id: None for a pending cancel
        request, else why (the error they fail with: their series are gone; whatever stands in for
        them in the list is not run); with `begin`, `begin` the batch in the same round trip (a read
        made right before its pass)."""
        ...

    def begin(self, batch: list[Slice]) -> None:
        """Mark the batch's jobs as in a forward pass (a worker's death now counts against them)."""
        ...

    def write(self, results: list[tuple[Slice, list[np.ndarray]]], completed: list[Work]) -> None:
        """Store each slice's results (float32 [variates, rows, horizon] per series), in order, and
        finish the `completed` jobs that have a `closing` (setting their `final`)."""
        ...


class Busy:
    """Seconds during which at least one pass was under way, the pass in progress included. The two
    lanes' passes may overlap (on a CPU they run side by side; on a GPU one waits for the device
    while the other runs), so their times are not added up: the union of their intervals is."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock, self._lock = clock, threading.Lock()
        self._running, self._since, self._total = 0, 0.0, 0.0

    def __enter__(self) -> None:
        with self._lock:
            if not self._running:
                self._since = self._clock()
            self._running += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._running -= 1
            if not self._running:
                self._total += self._clock() - self._since

    def seconds(self) -> float:
        with self._lock:
            return self._total + (self._clock() - self._since if self._running else 0.0)

    @property
    def under_way(self) -> bool:
        """Whether a pass is under way."""
        return self._running > 0


class Batcher:
    """The model threads (async lane, sync lane) and the work waiting for them."""

    def __init__(
        self, runtime: ModelRuntime, io: PassIO, wait_s: float = 0.0, sync_guard_s: float = 0.0,
        sync_guard_batch: int = 0, async_threads: int = 1,
    ):  # fmt: skip
        """`sync_guard_s`, `sync_guard_batch`: after sync work, async passes stay short for a while
        (SYNC_GUARD_S, SYNC_GUARD_BATCH in shared/settings.py). `async_threads`: model threads of
        the async lane, each running passes of its own (ASYNC_THREADS)."""
        self.runtime, self.io, self.wait_s = runtime, io, wait_s
        self.sync_guard_s, self.sync_guard_batch = sync_guard_s, sync_guard_batch
        self._sync_seen = -float("inf")  # monotonic time sync work last arrived
        self._pending: dict[Lane, deque[Work]] = {Lane.SYNC: deque(), Lane.ASYNC: deque()}
        # One lock, a condition per lane: a lane's model thread is woken by its own lane's work only
        # (a flood's async jobs never wake the sync thread), once per message, not once per job.
        self._lock = threading.Lock()
        self._ready = {lane: threading.Condition(self._lock) for lane in self._pending}
        self._async_idle = 0  # the first async thread waits for work: sync work is left to it (`_idle`)
        self._others_running = 0  # passes under way on the other async threads (ASYNC_THREADS)
        self._reserved_by: int | None = None  # the thread that may count on the idle worker (`reserve_idle`)
        self.async_threads = [threading.Thread(target=self._run, name="batcher" + (f"-{i}" if i else ""), daemon=True)
                              for i in range(async_threads)]  # fmt: skip
        self.sync_thread = threading.Thread(target=self._run_sync, name="batcher-sync", daemon=True)
        # Reads of the next async pass and writes of the last one run here, while the model computes.
        self._io_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pass-io")
        # The heartbeat reports the share of time the model was busy (the API holds messages longer
        # for a saturated model, api/sender.py).
        self.busy = Busy()

    @property
    def threads(self) -> list[threading.Thread]:
        """The threads that run the model."""
        return [*self.async_threads, self.sync_thread]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def submit(self, *works: Work) -> None:
        with self._lock:
            self._reserved_by = None
            lanes = {work.lane for work in works}
            if Lane.SYNC in lanes:
                self._sync_seen = time.monotonic()
            for work in works:
                self._pending[work.lane].append(work)
            if Lane.SYNC in lanes:  # the sync thread, and the first async thread if it is idle (`_idle`)
                self._ready[Lane.ASYNC].notify_all()
            for lane in lanes:
                self._ready[lane].notify_all()  # only the model threads wait on a lane

    def reserve_idle(self) -> bool:
        """Whether nothing is under way or waiting (and no batch wait), so that work submitted now goes
        into a pass at once (the async thread's, `_idle`), and this caller is the first to ask since:
        of claims made at the same moment, one only may count on that (workers/executor.py). The
        reservation ends at the next `submit`, or at `release_idle` by its holder."""
        with self._lock:
            idle = self._async_idle and not self.wait_s and not any(self._pending.values()) and not self.busy.under_way
            if not idle or self._reserved_by is not None:
                return False
            self._reserved_by = threading.get_ident()
            return True

    def release_idle(self) -> None:
        """End the caller's reservation (`reserve_idle`), if it still holds one."""
        with self._lock:
            if self._reserved_by == threading.get_ident():
                self._reserved_by = None

    def abandon(self, work: Work) -> None:
        """Schedule none of the job's remaining series (its task gave up on it)."""
        with self._lock:
            if work in self._pending[work.lane]:
                self._pending[work.lane].remove(work)

    # -- the model thread -----------------------------------------------------------------

    def _run(self) -> None:
        """Async pass after pass. The series of the next pass are read while this one computes and
        its results are stored after it, both on the I/O thread, so the model waits on no round
        trip but the one that marks its jobs in a pass. Idle, the first async thread serves sync
        work too (`_idle`); the others (ASYNC_THREADS) take async jobs that fit one pass only, on
        their share of the cores, and the first runs on every core while none of them has a pass
        under way (`ModelRuntime.use_threads`): a lone bulk job gets the whole CPU, a flood of
        small ones passes side by side."""
        first = threading.current_thread() is self.async_threads[0]
        self.runtime.pin_threads(sync=False)
        ahead: tuple[list[Slice], Future] | None = None
        while True:
            if ahead is None:
                if first:
                    sync = self._idle()
                    if sync:
                        self.runtime.use_threads(alone=not self._others_running)
                        self._sync_pass(sync)
                        continue
                else:
                    with self._lock:
                        self._ready[Lane.ASYNC].wait_for(lambda: bool(self._takeable(Lane.ASYNC)))
            taken = ahead or self._next(block=False)
            ahead = None
            if taken is None:  # the work it woke for was abandoned meanwhile
                continue
            batch, reading = taken
            ahead = self._next(block=False)
            if first:
                self.runtime.use_threads(alone=not self._others_running)
                self._guarded(batch, reading, store=self._store_later)
            else:
                with self._lock:
                    self._others_running += 1
                try:
                    self._guarded(batch, reading, store=self._store_later)
                finally:
                    with self._lock:
                        self._others_running -= 1
            self._release(batch, ahead)

    def _store_later(self, *done) -> None:
        """`_store` on the I/O thread, after the pass's read-ahead and the stores before it."""
        self._io_thread.submit(self._store, *done)

    def _release(self, batch: list[Slice], ahead: tuple[list[Slice], Future] | None) -> None:
        """After a pass (its results handed to the I/O thread, which stores them in order), the jobs
        of it this thread has no next slice of in hand may go to any async thread."""
        kept = {id(work) for work, _, _ in ahead[0]} if ahead else set()
        me = threading.get_ident()
        with self._lock:
            freed = False
            for work, _, _ in batch:
                if work.owner == me and id(work) not in kept:
                    work.owner = None
                    freed = freed or work.unscheduled > 0  # a next slice another thread may take now
            if freed and len(self.async_threads) > 1:
                self._ready[Lane.ASYNC].notify_all()

    def _idle(self) -> list[Slice]:
        """Wait for work with nothing under way; a sync pass if only sync work came, else [] for
        the async work. While this thread waits here, the sync thread leaves sync work to it: on a
        CPU this thread's passes run on all the intra-op threads and the sync thread's on one
        (`ModelRuntime.pin_threads`), so an idle worker answers a /v1/predict sooner (bolt-tiny on
        2 cores, bench/predict_latency.py in alternating runs: the pass 7.0-9.0 ms, median 7.9,
        against 9.1-9.4 on the sync thread). Async work waiting goes first here, as sync work has
        a thread of its own, which runs what comes while this one is busy."""
        with self._lock:
            self._async_idle += 1
            try:
                # With BATCH_WAIT_MS a sync pass waits to fill, which this thread must not (async work
                # would wait behind it): the sync thread takes all sync work then.
                self._ready[Lane.ASYNC].wait_for(
                    lambda: self._takeable(Lane.ASYNC) or (not self.wait_s and self._sync_ready())
                )
            finally:
                self._async_idle -= 1
            batch = [] if self._takeable(Lane.ASYNC) else self._take_locked(Lane.SYNC)
            if self._sync_ready():  # what this thread leaves: the sync thread may take it now
                self._ready[Lane.SYNC].notify_all()
            return batch

    def _run_sync(self) -> None:
        """Sync pass after sync pass, each read, run and stored on this thread: a sync pass waits
        for no async pass's reads or writes either. Sync work that comes while the async thread is
        idle is its (`_idle`)."""
        self.runtime.pin_threads(sync=True)
        while True:
            batch = self._take(block=True, lane=Lane.SYNC)
            if batch:  # none when the work it woke for was abandoned meanwhile
                self._sync_pass(batch)

    def _sync_pass(self, batch: list[Slice]) -> None:
        """Run and store a sync pass on this thread, then free its jobs' next slices for either thread."""
        try:
            self._guarded(batch)
        finally:
            with self._lock:
                for work, _, _ in batch:
                    work.running = False
                if self._sync_ready():  # its next slice: the sync thread, or the first async thread if idle
                    self._ready[Lane.SYNC].notify_all()
                    self._ready[Lane.ASYNC].notify_all()  # the other async threads wait there too

    def _sync_ready(self) -> bool:
        """Sync work that a pass may take now (the lock held): none of its slices is in a pass."""
        return any(not work.running for work in self._pending[Lane.SYNC])

    def _guarded(self, batch: list[Slice], reading: Future | None = None, store=None) -> None:
        """`_execute`, but a failure outside the model fails the pass's jobs, never the model thread."""
        try:
            self._execute(batch, reading, store)
        except Exception as exc:
            log.exception("batch failed outside the model")
            for work, _, _ in batch:
                self.abandon(work)  # a failed job's later slices must not be read and run for nothing
                self._finish(work, error=f"{type(exc).__name__}: {exc}")

    def _next(self, block: bool) -> tuple[list[Slice], Future] | None:
        """The next async pass and the read of its series, started on the I/O thread (None if nothing waits)."""
        batch = self._take(block, lane=Lane.ASYNC)
        return (batch, self._io_thread.submit(self.io.read, batch)) if batch else None

    def _takeable(self, lane: Lane) -> list[Work]:
        """The lane's work a pass of the calling thread may take now (the lock held): not a sync job
        with a slice in a pass, nor a job whose next slices another async thread holds; for an async
        thread but the first, only jobs that fit one pass (`_run`)."""
        me = threading.get_ident()
        if lane is Lane.ASYNC and len(self.async_threads) > 1 and me != self.async_threads[0].ident:
            fits = self.runtime.batch_limit
            return [w for w in self._pending[lane] if w.owner in (None, me) and w.n <= fits(w.params)]
        return [w for w in self._pending[lane] if not w.running and w.owner in (None, me)]

    def _pending_series(self, lane: Lane) -> int:
        """Series a pass of the calling thread could take now (`_takeable`)."""
        return sum(w.unscheduled for w in self._takeable(lane))

    def _take(self, block: bool = True, lane: Lane = Lane.ASYNC) -> list[Slice]:
        """The next forward pass of `lane`: (work, first series, end) slices of compatible jobs.

        Fair across jobs: the pass serves the group of the job that has waited longest since it was
        last served, and shares its room max-min among that group's jobs (each gets what it needs
        or an equal share, whichever is less). So a one-series job waits for about one pass, however
        large the jobs before it are; a large job is taken a slice at a time, in order."""
        ready = self._ready[lane]
        with ready:
            if not block and not self._takeable(lane):
                return []
            if block and lane is Lane.SYNC:  # the sync thread: not what the idle async thread takes
                ready.wait_for(lambda: self._sync_ready() and (self.wait_s or not self._async_idle))
            else:
                ready.wait_for(lambda: bool(self._takeable(lane)))
            return self._take_locked(lane)

    def _take_locked(self, lane: Lane) -> list[Slice]:
        """`_take`, with the lock held. A sync job with a slice in a pass waits for its end (`running`)."""
        ready, queue = self._ready[lane], self._pending[lane]

        def takeable() -> list[Work]:
            return self._takeable(lane)

        if not takeable():
            return []
        first = min(takeable(), key=lambda w: w.waiting_since)
        room = self._room(lane, first)
        if self.wait_s and self._pending_series(lane) < room:
            ready.wait_for(lambda: self._pending_series(lane) >= room, timeout=self.wait_s)
            if not takeable():  # its task gave up on it meanwhile, or the other thread took it
                return []
            first = min(takeable(), key=lambda w: w.waiting_since)
            room = self._room(lane, first)
        group = [w for w in takeable() if w.key == first.key]
        shares = dict.fromkeys(group, 0)
        for i, work in enumerate(sorted(group, key=lambda w: w.unscheduled)):  # water-filling
            shares[work] = min(work.unscheduled, max(1, room // (len(group) - i)))
            room -= shares[work]
            if room <= 0:
                break
        picked = []
        now = time.monotonic()
        for work in group:  # arrival order
            n = shares[work]
            if not n:
                continue
            picked.append((work, work.scheduled, work.scheduled + n))
            work.scheduled += n
            work.waiting_since = now
            work.running = lane is Lane.SYNC
            if lane is Lane.ASYNC:
                work.owner = threading.get_ident()
            if not work.unscheduled:
                queue.remove(work)
        return picked

    def _room(self, lane: Lane, first: Work) -> int:
        """Series the next pass may take: the batch limit for its parameters, and while sync requests
        keep coming, no more than the sync guard for async work."""
        room = self.runtime.batch_limit(first.params)
        if lane is Lane.ASYNC and time.monotonic() - self._sync_seen < self.sync_guard_s:
            room = min(room, self.sync_guard_batch or max(1, room // 4))
        return room

    def _execute(self, batch: list[Slice], reading: Future | None = None, store=None) -> None:
        """Run one pass: its series (read now, or by `reading`), the model, then `store` the results
        (called as `store(results, completed)`; by default at once, on this thread)."""
        # Read ahead on the I/O thread, the pass's jobs are marked once the cancelled ones are known;
        # read here, right before the pass (the sync thread), in the read's own round trip. A
        # cancelled job marked so is ended by its task thread all the same.
        decoded, stopped = reading.result() if reading is not None else self.io.read(batch, begin=True)
        live: list[Slice] = []
        inputs: list[Decoded] = []
        at = 0
        for work, start, end in batch:
            if work.job_id in stopped:  # its own end only: the pass's other jobs run
                self.abandon(work)
                self._finish(work, error=stopped[work.job_id], cancelled=stopped[work.job_id] is None)
            elif not work.finished.is_set():  # a job failed in an earlier pass has nothing left to run
                live.append((work, start, end))
                inputs.extend(decoded[at : at + end - start])
            at += end - start
        if not live:
            return
        if reading is not None:
            self.io.begin(live)
        params = [w.params for w, _, _ in live]
        horizon = max(p.prediction_length for p in params)
        levels = sorted({q for p in params for q in p.quantile_levels})
        samples = any(p.return_samples for p in params)
        metrics.BATCH.labels(self.runtime.spec.id).observe(len(inputs))
        started = time.perf_counter()
        with self.busy:
            outputs = self.runtime.predict_isolating(
                inputs, horizon, levels, sampling=params[0].sampling(), return_samples=samples, seed=params[0].seed,
                cross_learning=params[0].cross_learning,  # only ever one job's series (shared/families.py)
                variant=live[0][0].variant,  # one per pass: it is part of the key
            )  # fmt: skip
        elapsed = time.perf_counter() - started
        at = 0
        results, completed = [], []
        for work, start, end in live:
            work.model_s += elapsed
            mine = outputs[at : at + end - start]
            at += end - start
            failure = next((o for o in mine if isinstance(o, Exception)), None)
            if failure is not None:
                self.abandon(work)
                self._finish(work, error=f"{type(failure).__name__}: {failure}")
                continue
            sliced = [_slice(out, levels, work.params) for out in mine if not isinstance(out, Exception)]
            results.append(((work, start, end), sliced))
            if work.keep:
                work.kept.extend(sliced)
            work.done += end - start
            if work.done == work.n:
                completed.append(work)
        (store or self._store)(results, completed)

    def _store(self, results: list[tuple[Slice, list[np.ndarray]]], completed: list[Work]) -> None:
        """Store a pass's results, then finish the jobs it completed (their results must be stored first)."""
        try:
            self.io.write(results, completed)
        except Exception as exc:
            log.exception("storing a pass's results failed")
            for (work, _, _), _ in results:
                work.end_once()  # its task thread fails it: a later pass must not finish it with a gap
                self.abandon(work)
                self._finish(work, error=f"{type(exc).__name__}: {exc}")
            return
        for work in completed:
            self._finish(work)

    @staticmethod
    def _finish(work: Work, error: str | None = None, cancelled: bool = False) -> None:
        if work.finished.is_set():
            return
        work.error, work.cancelled = error, cancelled
        work.finished.set()


def _slice(out: np.ndarray, levels: list[float], params: ForecastParameters) -> np.ndarray:
    """One series' share of a pass: its own horizon and quantile levels (and samples if asked).
    `out` is [variates, mean + pass levels (+ samples), pass horizon]."""
    rows = [0, *(1 + levels.index(q) for q in params.quantile_levels)]
    if params.return_samples:
        rows.extend(range(1 + len(levels), out.shape[1]))
    return np.ascontiguousarray(out[:, rows, : params.prediction_length])
