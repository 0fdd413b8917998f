"""The jobs of one message, start to finish: claim them, run their series through the batcher, store
the outcomes."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from shared import cache, families
from shared.catalog import ModelSpec
from shared.schemas import ForecastParameters
from shared.series import Decoded, decode
from shared.settings import Settings
from shared.store import Appended, JobKind, JobRecord, JobStatus, JobStore, Lane, Outcome

from workers import anomaly, backtest, metrics
from workers.batcher import Batcher, Slice, Work

log = logging.getLogger(__name__)


class _Closing(NamedTuple):
    """What finishing a plain forecast job with its last pass's results takes (`Work.closing`)."""

    record: JobRecord
    fields: dict  # the record fields stored with its outcome; the task thread logs them afterwards
    digest: str | None  # its result cache entry (shared/cache.py), None when not cached


_GONE = Decoded.of([0.0])  # a series no longer stored, in the place of those of a job not run


class RedisPassIO:
    """A pass's series and results through the job store, each step one pipelined round trip: read
    the series of every job in the pass and their cancel flags; mark them `in_pass` right before the
    model runs; append the results, clear the mark and record progress, and finish the plain
    forecasts the pass completed (cached and ended, in the same round trip: their task threads only
    report). The mark is how a redelivery knows whether the job was in the pass that killed its
    worker (lua/start.lua). For an async pass the batcher reads and writes on its I/O thread while
    the model computes, and only the mark waits for Redis; a sync pass reads (and marks) right
    before it runs and stores after, on its model thread, and the first pass of a sync job an idle
    worker claimed reads nothing (`read`)."""

    def __init__(self, store: JobStore):
        self.store = store

    def read(self, batch: list[Slice], begin: bool = False) -> tuple[list[Decoded], dict[str, str | None]]:
        if begin:
            claimed = all(work.marked for work, _, _ in batch)
            for work, _, _ in batch:
                work.marked = False  # this pass's write clears the mark: a later pass makes its own
            if claimed:
                # Sync jobs an idle worker just claimed: the claim read their series and marked them
                # (lua/start.lua), so this pass needs no round trip. A cancel requested since ends
                # them as they finish (lua/finish.lua).
                return [e for work, start, end in batch for e in (work.inputs or [])[start:end]], {}
        slices = [(work.job_id, start, end, work.inputs is None, work.attempt) for work, start, end in batch]
        reads = self.store.read_pass(slices, mark=begin)
        decoded: list[Decoded] = []
        stopped: dict[str, str | None] = {}
        for (work, start, end), read in zip(batch, reads, strict=True):
            elements = work.inputs[start:end] if work.inputs is not None else [decode(e) for e in read.inputs or ()]
            # Its input list expired or was deleted under it (the job ended meanwhile: a timeout, a
            # redelivered duplicate that finished first): this job fails, not the pass's others.
            gone = len(elements) != end - start
            if read.cancel_requested or gone:
                stopped[work.job_id] = (
                    None if read.cancel_requested
                    else f"RuntimeError: job {work.job_id}: series {start}..{end} are no longer stored"
                )  # fmt: skip
            # Placeholders, never run, keep the other jobs' series in their places.
            decoded.extend([_GONE] * (end - start) if gone else elements)
        return decoded, stopped

    def begin(self, batch: list[Slice]) -> None:
        for work, _, _ in batch:
            work.marked = False
        self.store.mark_in_pass((work.job_id, work.attempt, start) for work, start, _ in batch)

    def write(self, results: list[tuple[Slice, list[np.ndarray]]], completed: list[Work]) -> None:
        # A job failed meanwhile (a timeout, an earlier pass's write) is its task thread's to end. By
        # work, not job id: a job claimed again while its first run goes on (lua/start.lua) has two
        # works here, each with its own results and outcome.
        closing = dict.fromkeys(
            w for w in completed if w.closing is not None and not w.finished.is_set() and w.end_once()
        )
        appended, last = [], {}
        for (work, start, end), arrays in results:
            elements = [a.tobytes() for a in arrays] if work.stored else []
            if work in closing:  # its last results travel with its finish script
                last[work] = elements
            else:  # the last pass's progress comes with the job's final state
                appended.append(Appended(work.job_id, work.attempt, elements, start, end if end < work.n else None))
        if not closing:
            if appended:
                self.store.append_results(appended)
            return
        outcomes = []
        for work in closing:
            record, fields, digest = work.closing
            fields.update(inference_s=round(work.model_s, 6), progress_done=work.done)
            outcomes.append(Outcome(record, JobStatus.SUCCEEDED, fields, digest, last.get(work, ())))
        for work, final in zip(closing, self.store.complete_pass(appended, outcomes), strict=True):
            work.final = final


def _failed(job_id: str, fields: dict, error: str) -> JobStatus:
    log.error("job %s failed: %s", job_id, error)
    fields["error"] = error
    return JobStatus.FAILED


# How a job of a kind that scores its forecasts (backtest, anomaly) turns the batcher's kept
# results into the fields its record stores and the result elements stored (None: the pass results).
Score = Callable[[Work], tuple[dict, list[bytes] | None]]
# The kinds of job whose series the worker cuts into windows of its own, and scores.
_SCORED: dict[JobKind, Callable[[list[bytes], JobRecord, ModelSpec], tuple[Work, Score]]] = {
    JobKind.BACKTEST: backtest.job,
    JobKind.ANOMALY: anomaly.job,
}


def _settle(
    work: Work, score: Score | None, store: JobStore, batcher: Batcher, deadline: float, max_job_s: float, fields: dict
) -> JobStatus:
    """Wait for a submitted job until `deadline` (monotonic), and score it when its kind does: its
    outcome (`fields` get what the job's record stores)."""
    finished = work.finished.wait(max(0.0, deadline - time.monotonic()))
    if not finished and not work.end_once():
        # The I/O thread is storing its end right now, retrying while Redis is away (for up to the
        # store's patience): failing the job meanwhile could fail one that completed. Waited for as
        # long as this task can still fail it itself (its own finish has that patience too) before
        # the visibility timeout hands the message out again (SETTINGS visibility_timeout_s).
        margin = store.settings.visibility_timeout_s - store.settings.max_job_s
        finished = work.finished.wait(max(60.0, margin - store.patience_s - 60))
    if not finished:
        batcher.abandon(work)
    fields["inference_s"] = round(work.model_s, 6)
    fields["progress_done"] = work.done
    error = work.error if finished else f"TimeoutError: not finished within MAX_JOB_S={max_job_s}s"
    if error:
        return _failed(work.job_id, fields, error)
    if work.cancelled:
        return JobStatus.CANCELLED
    if score is not None:
        try:
            scored, elements = score(work)
            if elements is not None:
                store.append_results([Appended(work.job_id, work.attempt, elements, 0, None)])
        except Exception as exc:  # scoring is ours, not the model's: still fail the job, not the worker
            log.exception("job %s: scoring its forecasts failed", work.job_id)
            fields["error"] = f"{type(exc).__name__}: {exc}"
            return JobStatus.FAILED
        fields.update(scored)
    return JobStatus.SUCCEEDED


class WrongRevision(ValueError):
    """A job pinned to weights this worker does not serve."""


def _work(store: JobStore, record: JobRecord, spec: ModelSpec, revision: str) -> tuple[Work, Score | None]:
    """What the batcher runs for a job (and how its results are scored, for a kind that scores them)."""
    pinned = record.request.get("parameters", {}).get("weights_revision")
    if pinned and pinned != revision:
        # Pinned jobs travel on their revision's queue, which only its workers consume; a message
        # that strays (sent again by hand, a worker restarted on other weights) must still not run here.
        raise WrongRevision(f"the job pins weights revision {pinned}; this worker serves {revision}")
    score = None
    if record.kind in _SCORED:
        elements = store.inputs(record.id)
        if not elements:  # the input list expired or was deleted under the job
            raise RuntimeError(f"job {record.id}: its series are no longer stored")
        work, score = _SCORED[record.kind](elements, record, spec)
    else:
        params = ForecastParameters.model_validate(record.request["parameters"])
        key = families.of(spec).group_key(params, record.id)
        work = Work(record.id, record.n_series, params, record.lane, key)
    work.attempt = record.attempts
    work.variant = record.request.get("finetuned")
    if work.variant:  # a fine-tuned model's series never share a pass with another model's
        work.key = (*work.key, ("finetuned", work.variant))
    if record.lost:
        # A job that was in the pass of a worker that died may be what killed it: it runs alone from
        # now on, so no other job shares its next passes (and its fate).
        work.key = (*work.key, record.id)
    return work, score


def _outcome(job: _Claimed, store: JobStore, batcher: Batcher, deadline: float, max_job_s: float) -> JobStatus:
    if job.work is None:
        return job.failed or JobStatus.FAILED
    return _settle(job.work, job.score, store, batcher, deadline, max_job_s, job.fields)


class _Claimed(NamedTuple):
    record: JobRecord
    fields: dict
    work: Work | None = None
    score: Score | None = None
    failed: JobStatus | None = None  # the job could not even be read


def _claim(
    job_ids: Sequence[str], batcher: Batcher, store: JobStore, settings: Settings, worker: str, read_sync: bool,
    statuses: dict[str, str],
) -> list[_Claimed]:  # fmt: skip
    """Claim a message's jobs (with `read_sync`, a sync job's series with its claim) and build the
    `Work` of each runnable one; a job skipped or failed by its claim gets its status in `statuses`."""
    spec = batcher.runtime.spec
    claimed: list[_Claimed] = []
    # The metrics' children looked up once a message, not once a job.
    waited = {lane: metrics.QUEUE_WAIT.labels(spec.id, lane.value) for lane in (Lane.ASYNC, Lane.SYNC)}
    claims = store.start(spec, job_ids, worker, batcher.runtime.max_batch if read_sync else 0)
    for job_id, (state, record, inputs) in zip(job_ids, claims, strict=True):
        if state != JobStatus.RUNNING or record is None:
            if state == JobStatus.FAILED:  # the claim failed it: its worker was lost MAX_DELIVERIES times
                log.error("job %s failed: %s", job_id, record.error if record else "")
            else:
                log.info("job %s: not runnable (%s), skipped", job_id, state)
            metrics.JOBS.labels(spec.id, "dropped" if state != JobStatus.FAILED else "failed").inc()
            statuses[job_id] = state
            continue
        wait = waited.get(record.lane)
        if wait is None:
            wait = metrics.QUEUE_WAIT.labels(spec.id, record.lane.value)
        wait.observe(max(0.0, time.time() - record.created_at))
        fields: dict = {"weights": batcher.runtime.weights.kind, "inference_s": 0.0}
        try:
            work, score = _work(store, record, spec, batcher.runtime.weights.revision)
            if score is None:  # nothing to do once forecast: finished with its last results (RedisPassIO)
                work.closing = _Closing(record, fields, _digest(spec, batcher, settings, record))
            if inputs is not None and len(inputs) == record.n_series:  # `read_sync`: none missing
                work.inputs, work.marked = [decode(e) for e in inputs], True
        except Exception as exc:  # a job this worker cannot read fails, not the worker nor the message's others
            claimed.append(_Claimed(record, fields, failed=_failed(job_id, fields, f"{type(exc).__name__}: {exc}")))
        else:
            claimed.append(_Claimed(record, fields, work, score))
    return claimed


def execute(job_ids: Sequence[str], batcher: Batcher, store: JobStore, settings: Settings, worker: str) -> list[str]:
    """Run the jobs of one message (on a task thread); returns their statuses afterwards.

    A message carries one job, or several small ones the API sent together (api/sender.py): they
    are claimed in one command, handed to the batcher together, and each finished as soon as it
    ends, with the others that ended in the same pass (one round trip). A job no
    longer runnable (cancelled while queued, finished by an earlier delivery, expired) is skipped
    without touching the model.
    """
    spec = batcher.runtime.spec
    statuses: dict[str, str] = {}
    inference, served = metrics.INFERENCE.labels(spec.id), metrics.SERIES.labels(spec.id)
    # A worker with nothing under way or waiting runs a small sync job at once: its claim reads its
    # series and marks it in a pass, and the pass needs no round trip (RedisPassIO.read). One claim
    # of one job at a time: of jobs claimed together, all but one would wait, marked.
    reserved = len(job_ids) == 1 and batcher.reserve_idle()
    try:
        claimed = _claim(job_ids, batcher, store, settings, worker, reserved, statuses)
        batcher.submit(*(job.work for job in claimed if job.work is not None))  # together: one wake-up
    finally:
        batcher.release_idle()  # after `submit`, which ended it, a no-op
    deadline = time.monotonic() + settings.max_job_s
    pending = claimed
    while pending:
        # Each job is finished as soon as it ends, with the others of the message that ended by then
        # (one round trip for the jobs of one pass): none waits for a slower neighbour.
        head, rest = pending[0], pending[1:]
        head_status = _outcome(head, store, batcher, deadline, settings.max_job_s)
        done_now = [job.work is None or job.work.finished.is_set() for job in rest]
        ended = [job for job, done in zip(rest, done_now, strict=True) if done]
        pending = [job for job, done in zip(rest, done_now, strict=True) if not done]
        wave = [head, *ended]
        outcomes = [(head.record, head_status, head.fields)]
        outcomes += [
            (job.record, _outcome(job, store, batcher, deadline, settings.max_job_s), job.fields) for job in ended
        ]
        # Jobs the pass I/O thread finished are only reported here; the others end now.
        closed = [job.work is not None and job.work.final is not None for job in wave]
        left = []
        for (record, status, fields), done in zip(outcomes, closed, strict=True):
            if not done:
                digest = _digest(spec, batcher, settings, record) if status == JobStatus.SUCCEEDED else None
                left.append(Outcome(record, status, fields, digest))
        finals = iter(store.finish(left) if left else [])
        by_final: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
        for (record, _, fields), job, done in zip(outcomes, wave, closed, strict=True):
            final = job.work.final if done and job.work and job.work.final else next(finals)
            n = job.work.n if job.work else 0
            by_final[final].append((record.id, n, fields["inference_s"]))
            inference.observe(fields["inference_s"])
            if final == JobStatus.SUCCEEDED:
                served.inc(n)
            statuses[record.id] = final
        for final, jobs in by_final.items():
            metrics.JOBS.labels(spec.id, final).inc(len(jobs))
            # One line a wave, not a job: at thousands of jobs a second, a line a job was a seventh
            # of the worker's CPU outside the model. The ids stay greppable.
            log.info("%s: %s (%d series, %.3fs in the model at most)", " ".join(i for i, _, _ in jobs), final,
                     sum(n for _, n, _ in jobs), max(s for _, _, s in jobs))  # fmt: skip
    return [statuses[job_id] for job_id in job_ids]


def _digest(spec: ModelSpec, batcher: Batcher, settings: Settings, record: JobRecord) -> str | None:
    """The result cache entry of a job's results, None when they are not cached (not deterministic,
    no identity, the cache off)."""
    if not settings.cache_ttl_s or not record.identity:
        return None
    if not families.of(spec).cacheable(record.request.get("parameters", {})):
        return None
    return cache.digest(spec, batcher.runtime.weights.revision, record.identity)
