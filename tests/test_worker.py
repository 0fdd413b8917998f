"""The worker's job function, batcher and model runtime, in-process, on a real Redis and a real checkpoint."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from api import render
from api.bodies import forecast_job
from shared import catalog
from shared.store import JobRecord, JobStatus, JobStore, Lane, keys
from shared.schemas import ForecastParameters, ForecastRequest
from shared.series import Decoded
from workers.batcher import Batcher, Work
from workers.executor import RedisPassIO, execute
from workers.runtime import ModelRuntime
from workers.weights import resolve

from conftest import BOLT, forecast_body, settings_for


@pytest.fixture(scope="module")
def runtime(redis_server, synthetic_dir) -> ModelRuntime:
    settings = settings_for(redis_server, weights="synthetic", synthetic_dir=str(synthetic_dir), max_batch=8)
    spec = catalog.get(BOLT)
    return ModelRuntime(spec, resolve(spec, settings), settings)


def raw_client(redis_server):
    return redis.Redis.from_url(redis_server.url)


def store_for(redis_server) -> JobStore:
    return JobStore(raw_client(redis_server), settings_for(redis_server))


@pytest.fixture()
def io(redis_server) -> RedisPassIO:
    return RedisPassIO(store_for(redis_server))


@pytest.fixture()
def batcher(runtime, io) -> Batcher:
    batcher = Batcher(runtime, io)
    batcher.start()
    return batcher


def run_job(redis_server, batcher, body, lane=Lane.ASYNC, **settings) -> JobRecord:
    """Store a job as the API does (record and series), run it as a worker's task does, read it back
    (`settings`: the worker's, unvalidated, so a test may use a MAX_JOB_S below the allowed least)."""
    client, raw = redis_server.client(), raw_client(redis_server)
    job_id = uuid.uuid4().hex
    job = forecast_job(ForecastRequest.model_validate(body))
    request = {"parameters": job.parameters.model_dump(mode="json")}
    record = JobRecord(
        job_id, BOLT, JobStatus.QUEUED, lane, len(body["inputs"]), 4, time.time(), "owner", request=request
    )
    raw.rpush(keys.job_input(job_id), *job.series.encode())
    client.hset(keys.job(job_id), mapping=record.to_hash())
    client.set(
        keys.job_items(job_id), msgspec.msgpack.encode([[s.get("item_id"), None, False] for s in body["inputs"]])
    )
    execute(
        [job_id],
        batcher,
        store_for(redis_server),
        settings_for(redis_server).model_copy(update=settings),
        "test-worker",
    )
    done = JobRecord.from_hash(client.hgetall(keys.job(job_id)))
    outputs = raw.lrange(keys.job_output(job_id), 0, -1)
    items = msgspec.msgpack.decode(raw.get(keys.job_items(job_id)))
    return render.attach(done, outputs, items) if done.status is JobStatus.SUCCEEDED else done


def test_a_job_whose_model_call_raises_ends_failed_with_the_message(redis_server, batcher, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(batcher.runtime.pipeline, "predict_quantiles", broken)

    rec = run_job(redis_server, batcher, forecast_body(BOLT))

    assert rec.status is JobStatus.FAILED
    assert rec.error == "RuntimeError: CUDA error: device-side assert triggered"
    assert rec.predictions is None and rec.finished_at is not None


def test_a_job_larger_than_the_model_batch_is_split_and_keeps_series_order(redis_server, batcher):
    n = batcher.runtime.max_batch * 2 + 3
    body = forecast_body(BOLT, n_series=n, length=40, horizon=4)

    rec = run_job(redis_server, batcher, body)

    assert rec.status is JobStatus.SUCCEEDED
    assert [p["item_id"] for p in rec.predictions] == [f"s{i}" for i in range(n)]
    single = run_job(redis_server, batcher, {**body, "inputs": [body["inputs"][n - 1]]})
    # Same forecast as the series alone, up to float noise: a batch left-pads to its longest series.
    assert rec.predictions[-1]["0.5"] == pytest.approx(single.predictions[0]["0.5"], rel=1e-5)


def test_a_forecast_ends_with_its_last_results_in_the_pass_round_trip_not_from_its_task_thread(
    redis_server, batcher, monkeypatch
):
    trips = []
    complete_pass = batcher.io.store.complete_pass

    def counted(*args):
        trips.append(args)
        return complete_pass(*args)

    monkeypatch.setattr(batcher.io.store, "complete_pass", counted)
    monkeypatch.setattr(JobStore, "finish", lambda store, outcomes: pytest.fail(f"the task thread finished {outcomes}"))
    body = forecast_body(BOLT, n_series=2, length=30, horizon=3)
    body["inputs"][0]["item_id"] = uuid.uuid4().hex  # not a cache hit of another test's job

    rec = run_job(redis_server, batcher, body)

    assert rec.status is JobStatus.SUCCEEDED and rec.progress_done == 2 and rec.inference_s > 0
    assert len(rec.predictions) == 2 and rec.weights == "synthetic"
    ((appended, (outcome,)),) = trips  # its end, with its last results
    assert appended == [] and outcome.record.id == rec.id and len(outcome.results) == 2


def test_a_job_that_timed_out_is_not_finished_by_its_pass_ending_afterwards(redis_server, runtime, io, monkeypatch):
    release = threading.Event()
    real = runtime.predict

    def stuck(inputs, *args, **kwargs):
        release.wait(60)  # the pass outlasts the job's MAX_JOB_S
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(runtime, "predict", stuck)
    closed = []
    complete_pass = io.store.complete_pass
    monkeypatch.setattr(io.store, "complete_pass", lambda *args: closed.append(args[1]) or complete_pass(*args))
    batcher = Batcher(runtime, io)
    batcher.start()

    rec = run_job(redis_server, batcher, forecast_body(BOLT, length=33, horizon=3), max_job_s=1)
    release.set()
    batcher.submit(work(runtime, [series(1)]))  # a pass after the stuck one: the stuck one was stored
    deadline = time.monotonic() + 30
    while batcher._pending[Lane.ASYNC] and time.monotonic() < deadline:
        time.sleep(0.05)

    assert rec.status is JobStatus.FAILED and rec.error.startswith("TimeoutError")
    assert all(o.record.id != rec.id for outcomes in closed for o in outcomes)  # its task thread ended it alone
    assert JobRecord.from_hash(redis_server.client().hgetall(keys.job(rec.id))).status is JobStatus.FAILED


def test_series_longer_than_the_context_are_cut_to_the_context_window(runtime):
    context = runtime.spec.context_length
    tail = [float(i % 17) for i in range(context)]
    long_series = [1e6] * 500 + tail

    (long,), (exact,) = (runtime.predict([Decoded.of(s)], 4, [0.5]) for s in (long_series, tail))

    assert long.tolist() == exact.tolist()


def work(runtime, inputs, lane=Lane.ASYNC, **params) -> Work:
    """In-memory work whose results are kept (as a backtest's are), so a test can read them."""
    p = ForecastParameters(**{"prediction_length": 4, **params})
    return Work(uuid.uuid4().hex, len(inputs), p, lane, runtime.family.group_key(p), inputs=inputs, keep=True)


def series(k: int, n: int = 48) -> Decoded:
    return Decoded.of([float((t * (k + 2)) % 11) for t in range(n)])


def level(result, levels: list[float], q: float) -> list[float]:
    """One quantile level's row of a series' result ([variates, mean + levels, horizon])."""
    return result[0, 1 + levels.index(q)].tolist()


def test_jobs_with_different_horizons_and_levels_share_a_pass_and_get_what_they_would_alone(runtime, io):
    a = work(runtime, [series(1)], prediction_length=3, quantile_levels=[0.5])
    b = work(runtime, [series(2), series(3)], prediction_length=7, quantile_levels=[0.1, 0.9])
    batcher = Batcher(runtime, io)
    batcher.submit(a)
    batcher.submit(b)

    batch = batcher._take()  # what the model thread does next, called directly
    batcher._execute(batch)

    assert [(w, start, end) for w, start, end in batch] == [(a, 0, 1), (b, 0, 2)]
    assert a.finished.is_set() and b.finished.is_set()
    assert a.kept[0].shape == (1, 2, 3)  # mean and its one level, 3 steps
    assert b.kept[1].shape == (1, 3, 7)  # mean, 0.1 and 0.9, 7 steps
    (alone,) = runtime.predict([series(3)], 7, [0.1, 0.9])
    assert level(b.kept[1], [0.1, 0.9], 0.9) == pytest.approx(level(alone, [0.1, 0.9], 0.9), rel=1e-5)


def test_sync_work_runs_on_the_idle_async_thread_or_beside_its_pass_in_progress(runtime, io, monkeypatch):
    """The async thread, idle, takes sync work (its passes use every intra-op thread on a CPU); the
    sync thread runs what comes while it is busy, beside the async pass in progress, not after it."""
    ran_on, bulk_running, release = {}, threading.Event(), threading.Event()
    real = runtime.predict

    def recording(inputs, *args, **kwargs):
        ran_on[len(inputs)] = threading.current_thread().name
        if len(inputs) == 4:  # the bulk job's pass: held until the second sync job is done
            bulk_running.set()
            release.wait(60)
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(runtime, "predict", recording)
    batcher = Batcher(runtime, io)
    batcher.start()
    time.sleep(0.2)  # both threads wait for work
    idle = work(runtime, [series(98)], lane=Lane.SYNC)
    batcher.submit(idle)
    assert idle.finished.wait(60) and idle.error is None
    bulk = work(runtime, [series(k) for k in range(4)])
    batcher.submit(bulk)
    assert bulk_running.wait(60)
    busy = work(runtime, [series(k) for k in (96, 97)], lane=Lane.SYNC)

    batcher.submit(busy)

    assert busy.finished.wait(60) and busy.error is None and len(busy.kept) == 2
    assert not bulk.finished.is_set()  # its pass is still in progress
    release.set()
    assert bulk.finished.wait(60) and bulk.error is None
    assert ran_on == {1: "batcher", 4: "batcher", 2: "batcher-sync"}


def test_async_work_waiting_keeps_the_async_thread_and_sync_work_goes_to_its_own(runtime, io, monkeypatch):
    """The idle async thread takes sync work only while no async work waits: a steady stream of
    sync requests cannot starve async jobs."""
    ran_on, real = {}, runtime.predict

    def recording(inputs, *args, **kwargs):
        ran_on[len(inputs)] = threading.current_thread().name
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(runtime, "predict", recording)
    batcher = Batcher(runtime, io)
    batcher.start()
    time.sleep(0.2)  # both threads wait for work
    bulk, sync = work(runtime, [series(k) for k in range(3)]), work(runtime, [series(9)], lane=Lane.SYNC)

    batcher.submit(bulk, sync)

    assert bulk.finished.wait(60) and sync.finished.wait(60) and bulk.error is None and sync.error is None
    assert ran_on == {3: "batcher", 1: "batcher-sync"}


def test_with_a_batch_wait_sync_work_waits_on_its_own_thread_not_on_the_async_one(runtime, io, monkeypatch):
    """BATCH_WAIT_MS: a sync pass waits to fill; the idle async thread leaves it to the sync thread,
    so async work that comes meanwhile is not held behind that wait (it waits its own)."""
    started, real = [], runtime.predict

    def recording(inputs, *args, **kwargs):
        started.append((len(inputs), threading.current_thread().name))
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(runtime, "predict", recording)
    batcher = Batcher(runtime, io, wait_s=0.5)
    batcher.start()
    time.sleep(0.2)  # both threads wait for work
    sync, bulk = work(runtime, [series(9)], lane=Lane.SYNC), work(runtime, [series(k) for k in range(3)])

    batcher.submit(sync)
    time.sleep(0.05)
    batcher.submit(bulk)

    assert bulk.finished.wait(60) and sync.finished.wait(60) and bulk.error is None and sync.error is None
    assert dict(started) == {1: "batcher-sync", 3: "batcher"}


def test_a_sync_job_larger_than_a_pass_runs_its_slices_in_order_on_either_thread(runtime, io, monkeypatch):
    """Both model threads take sync work; one job's slices still run one after another, so its
    results are kept (and stored) in series order."""
    real, overlapping, running = runtime.predict, [], threading.Semaphore(1)

    def slow(inputs, *args, **kwargs):
        if not running.acquire(blocking=False):
            overlapping.append(len(inputs))  # two passes of the one job at once
            return real(inputs, *args, **kwargs)
        try:
            time.sleep(0.05)  # time for the other thread to take the next slice, if it could
            return real(inputs, *args, **kwargs)
        finally:
            running.release()

    monkeypatch.setattr(runtime, "predict", slow)
    batcher = Batcher(runtime, io)
    batcher.start()
    inputs = [Decoded.of([float((t * 3) % 11 + k) for t in range(48)]) for k in range(3 * runtime.max_batch + 1)]
    big = work(runtime, inputs, lane=Lane.SYNC)

    batcher.submit(big)

    assert big.finished.wait(60) and big.error is None
    assert overlapping == []
    levels = big.params.quantile_levels
    for k, result in enumerate(big.kept):  # series k's forecast, not another's (the series all differ)
        alone = real([inputs[k]], 4, levels)[0]
        assert level(result, levels, 0.5) == pytest.approx(level(alone, levels, 0.5), rel=1e-4), k


def test_with_two_async_threads_a_jobs_slices_run_on_one_at_a_time_in_order_while_the_other_runs_others(
    runtime, io, monkeypatch
):
    """ASYNC_THREADS=2: each thread runs passes of its own; a job larger than a pass is held by one
    thread at a time, so its slices never overlap and its results are kept in series order."""
    real, passes, lock = runtime.predict, [], threading.Lock()
    inputs = [Decoded.of([float((t * 3) % 11 + k) for t in range(48)]) for k in range(4 * runtime.max_batch + 1)]
    mine = {id(d) for d in inputs}

    def slow(batch, *args, **kwargs):
        started = time.monotonic()
        time.sleep(0.03)  # time for the other thread to take the next slice, if it could
        out = real(batch, *args, **kwargs)
        with lock:
            passes.append(
                (threading.current_thread().name, started, time.monotonic(), any(id(d) in mine for d in batch))
            )
        return out

    monkeypatch.setattr(runtime, "predict", slow)
    batcher = Batcher(runtime, io, async_threads=2)
    batcher.start()
    big = work(runtime, inputs)
    big.attempt = 1  # as claimed: its results are stored, pass by pass (lua/append.lua)
    io.store.client.hset(keys.job(big.job_id), mapping={"status": "running", "attempts": 1})
    small = [work(runtime, [series(k)]) for k in range(6)]

    batcher.submit(big)
    for job in small:  # arriving while the big job's passes run: the thread not holding it takes them
        time.sleep(0.03)
        batcher.submit(job)

    assert all(w.finished.wait(60) and w.error is None for w in (big, *small))
    ofbig = sorted((start, end) for _, start, end, has in passes if has)
    assert all(end <= start for (_, end), (start, _) in zip(ofbig, ofbig[1:]))  # never two at once
    assert {name for name, *_ in passes} == {"batcher", "batcher-1"}
    levels = big.params.quantile_levels
    for k, result in enumerate(big.kept):  # series k's forecast, not another's (the series all differ)
        alone = real([inputs[k]], 4, levels)[0]
        assert level(result, levels, 0.5) == pytest.approx(level(alone, levels, 0.5), rel=1e-4), k
    stored = io.store.client.lrange(keys.job_output(big.job_id), 0, -1)
    assert stored == [r.tobytes() for r in big.kept]  # stored in series order too


def test_a_job_is_handed_to_another_async_thread_only_when_its_holder_keeps_none_of_it_in_hand(runtime, io):
    batcher = Batcher(runtime, io, async_threads=2)  # not started: two threads of the test's own take
    first, second = ThreadPoolExecutor(1), ThreadPoolExecutor(1)  # as the first async thread and another

    def on(thread: ThreadPoolExecutor, call, *args):
        return thread.submit(call, *args).result(10)

    batcher.async_threads[0] = on(first, threading.current_thread)
    # Two jobs that each fit a pass share one, half each: each has a second slice to come.
    halves = [work(runtime, [series(k) for k in range(runtime.max_batch)]) for _ in range(2)]
    other = work(runtime, [series(9)], prediction_length=runtime.spec.prediction_length + 5)  # another key
    batcher.submit(*halves, other)

    taken = on(first, batcher._take, False)  # the first halves
    ahead = on(first, batcher._take, False)  # the job that has waited longest since: the other one
    meanwhile = on(second, batcher._take, False)
    on(first, batcher._release, taken, (ahead, None))  # after the pass: none of the halves in hand
    handed = on(second, batcher._take, False)

    half = runtime.max_batch // 2
    assert [(w, start) for w, start, _ in taken] == [(halves[0], 0), (halves[1], 0)]
    assert [w for w, _, _ in ahead] == [other]
    assert meanwhile == []  # their holder might still take their next slices
    assert [(w, start) for w, start, _ in handed] == [(halves[0], half), (halves[1], half)]


def test_only_the_first_async_thread_takes_a_job_larger_than_a_pass(runtime, io):
    batcher = Batcher(runtime, io, async_threads=2)  # not started: a thread of the test's own takes
    big = work(runtime, [series(k) for k in range(runtime.max_batch + 1)])
    batcher.submit(big)

    elsewhere = ThreadPoolExecutor(1).submit(batcher._take, False).result(10)  # not the first async thread

    assert elsewhere == [] and batcher._pending[Lane.ASYNC][0] is big


def test_with_two_async_threads_a_sync_jobs_next_slice_wakes_the_idle_first_async_thread(runtime, io, monkeypatch):
    real = runtime.predict

    def paced(batch, *args, **kwargs):  # sync passes slow: the first async thread is idle when one ends
        time.sleep(0.3 if threading.current_thread().name == "batcher-sync" else 0.01)
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(runtime, "predict", paced)
    batcher = Batcher(runtime, io, async_threads=2)
    batcher.start()
    bulk = work(runtime, [series(k) for k in range(2 * runtime.max_batch)])  # the first async thread's
    sync = work(runtime, [series(k) for k in range(2 * runtime.max_batch)], lane=Lane.SYNC)

    batcher.submit(bulk)
    time.sleep(0.005)
    batcher.submit(sync)  # its first slice on the sync thread, the first async thread busy

    assert bulk.finished.wait(30) and sync.finished.wait(10) and sync.error is None


def test_incompatible_parameters_never_share_a_pass(runtime, io):
    native = work(runtime, [series(1)], prediction_length=10)
    beyond = work(runtime, [series(2)], prediction_length=runtime.spec.prediction_length + 5)
    batcher = Batcher(runtime, io)
    batcher.submit(native)
    batcher.submit(beyond)

    assert [w for w, _, _ in batcher._take()] == [native]
    assert [w for w, _, _ in batcher._take()] == [beyond]


def test_out_of_memory_splits_the_batch_lowers_the_limit_and_every_series_succeeds(runtime, monkeypatch):
    real = runtime.pipeline.predict_quantiles
    monkeypatch.setattr(runtime, "max_batch", 8)

    def tight(inputs, **kwargs):
        if len(inputs) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(inputs, **kwargs)

    monkeypatch.setattr(runtime.pipeline, "predict_quantiles", tight)

    outputs = runtime.predict_isolating([series(k) for k in range(8)], 4, [0.5])

    assert all(not isinstance(o, Exception) and o.shape == (1, 2, 4) for o in outputs)
    assert runtime.max_batch == 2


def test_a_series_that_fails_alone_fails_only_its_job(runtime, monkeypatch, io):
    real = runtime.pipeline.predict_quantiles

    def picky(inputs, **kwargs):
        if (inputs == 777.0).any():
            raise ValueError("bad series")
        return real(inputs, **kwargs)

    monkeypatch.setattr(runtime.pipeline, "predict_quantiles", picky)
    bad_series = Decoded.of([777.0, *series(3).target[0].tolist()])
    good, bad = work(runtime, [series(1), series(2)]), work(runtime, [bad_series])
    batcher = Batcher(runtime, io)
    batcher.submit(good)
    batcher.submit(bad)

    batcher._execute(batcher._take())

    assert good.error is None and len(good.kept) == 2
    assert bad.error == "ValueError: bad series"


@pytest.mark.parametrize("failing", ["read", "write"])
def test_a_job_whose_pass_fails_outside_the_model_leaves_no_slice_behind(runtime, io, monkeypatch, failing):
    job, other = work(runtime, [series(k) for k in range(runtime.max_batch * 2)]), work(runtime, [series(1)])
    job.inputs = None  # its series are read from Redis pass by pass
    batcher = Batcher(runtime, io)
    batcher.submit(job)
    calls = []

    def broken(*args, **kwargs):  # its first pass's read or store fails (Redis went away, say)
        calls.append(failing)
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(io, failing, broken)
    if failing == "write":  # the pass reads its series as it holds them
        job.inputs = [series(k) for k in range(job.n)]
    batcher._guarded(batcher._take())
    batcher.submit(other)

    assert calls == [failing]
    assert job.error == "ConnectionError: Redis went away" and job.finished.is_set()
    assert batcher._take() == [(other, 0, 1)]  # the failed job's second slice was never taken


def test_of_claims_made_while_the_worker_is_idle_one_only_may_count_on_it(runtime, io):
    batcher = Batcher(runtime, io)
    batcher._async_idle = 1  # its async thread waits for work (`_idle`; the threads are not started here)

    assert batcher.reserve_idle() and not batcher.reserve_idle()  # a second claim at the same moment
    batcher.release_idle()
    assert batcher.reserve_idle()
    batcher.submit(work(runtime, [series(1)], lane=Lane.SYNC))  # the claimed job: the worker is busy now
    batcher.release_idle()  # (its holder's `finally`) ends nothing more
    assert not batcher.reserve_idle()


def test_a_sync_job_claimed_in_a_pass_skips_one_round_trip_and_its_later_passes_are_marked(
    runtime, io, redis_server, monkeypatch
):
    claimed = work(runtime, [series(k) for k in range(4)], lane=Lane.SYNC)
    claimed.marked = True  # what an idle worker's claim did (lua/start.lua)
    other = work(runtime, [series(9)], lane=Lane.SYNC)
    client = redis_server.client()
    for job in (claimed, other):  # records as claimed, so that a pass's mark has something to mark
        client.hset(keys.job(job.job_id), mapping={"status": "running", "attempts": 1})
        job.attempt = 1
    reads = []
    real = io.store.read_pass

    def counted(slices, mark=False):
        reads.append([job_id for job_id, *_ in slices])
        return real(slices, mark)

    monkeypatch.setattr(io.store, "read_pass", counted)
    alone, _ = io.read([(claimed, 0, 2)], begin=True)
    assert reads == [] and len(alone) == 2  # its first pass: no round trip
    claimed.marked = True
    io.read([(claimed, 0, 2), (other, 0, 1)], begin=True)  # a pass shared with work that needs a mark
    assert reads == [[claimed.job_id, other.job_id]] and not claimed.marked
    client.hdel(keys.job(claimed.job_id), "in_pass")  # what that pass's write does

    io.read([(claimed, 2, 4)], begin=True)  # its next pass marks it again

    assert reads[-1] == [claimed.job_id] and client.hget(keys.job(claimed.job_id), "in_pass") == "2"


def test_a_cancel_request_stops_a_job_before_its_next_pass(runtime, io, redis_server):
    job = work(runtime, [series(k) for k in range(runtime.max_batch * 2)])
    batcher = Batcher(runtime, io)
    batcher.submit(job)
    batcher._execute(batcher._take())
    redis_server.client().hset(keys.job(job.job_id), "cancel_requested", "1")  # what DELETE does to a running job

    batcher._execute(batcher._take())

    assert job.cancelled and job.finished.is_set()
    assert job.done == runtime.max_batch  # the second pass never ran it
    assert not any(batcher._pending.values())


def test_a_job_whose_series_are_gone_fails_alone_and_the_others_of_its_pass_run(runtime, io, redis_server):
    """Its input list deleted under it (it ended meanwhile: a timeout, a duplicate finished first)."""
    raw = raw_client(redis_server)
    params = ForecastParameters(prediction_length=4)
    jobs = [Work(uuid.uuid4().hex, 2, params, Lane.ASYNC, runtime.family.group_key(params), keep=True) for _ in range(3)]
    for k, job in enumerate(jobs):
        raw.rpush(keys.job_input(job.job_id), *forecast_job(ForecastRequest.model_validate(
            forecast_body(BOLT, n_series=2, length=30 + k, horizon=4))).series.encode())  # fmt: skip
    raw.delete(keys.job_input(jobs[1].job_id))
    batcher = Batcher(runtime, io)
    batcher.submit(*jobs)

    batcher._execute(batcher._take())

    assert [(job.finished.is_set(), job.done, job.cancelled) for job in jobs] == [(True, 2, False), (True, 0, False),
                                                                                 (True, 2, False)]  # fmt: skip
    assert "series 0..2 are no longer stored" in jobs[1].error and jobs[0].error is None and jobs[2].error is None
    assert [len(job.kept) for job in jobs] == [2, 0, 2]


def passes() -> float:
    return REGISTRY.get_sample_value("chronos_queue_worker_batch_size_count", {"model": BOLT}) or 0.0


def test_the_model_thread_serves_many_concurrent_jobs_in_shared_passes(redis_server, batcher):
    bodies = [forecast_body(BOLT, n_series=1, length=30 + k, horizon=4) for k in range(24)]
    records = [None] * len(bodies)
    before = passes()

    def one(i):
        records[i] = run_job(redis_server, batcher, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert [r.status for r in records] == [JobStatus.SUCCEEDED] * 24
    # 24 one-series jobs arriving together, at most 8 series a pass: they shared passes.
    assert 3 <= passes() - before < 24


def test_a_one_series_job_waits_about_one_pass_behind_a_3000_series_job(runtime, io):
    big = work(runtime, [series(k % 50) for k in range(3000)])
    batcher = Batcher(runtime, io)
    batcher.submit(big)
    first = batcher._take()  # the big job's first pass is under way
    small = work(runtime, [series(7)])
    batcher.submit(small)

    second = batcher._take()

    assert [w for w, _, _ in first] == [big]
    assert small in [w for w, _, _ in second]  # its series go into the very next pass
    assert sum(end - start for _, start, end in second) <= runtime.max_batch
    assert big.scheduled == runtime.max_batch + sum(end - start for w, start, end in second if w is big)


def test_after_sync_work_async_passes_stay_short_so_the_next_sync_call_waits_little(runtime, io):
    guarded = Batcher(runtime, io, sync_guard_s=60, sync_guard_batch=2)
    p = ForecastParameters(prediction_length=4)
    backlog = Work("bulk", 20, p, Lane.ASYNC, runtime.family.group_key(p))
    guarded.submit(backlog)
    before_sync = guarded._take()
    guarded.submit(Work("sync", 1, p, Lane.SYNC, runtime.family.group_key(p)))
    sync_pass = guarded._take(lane=Lane.SYNC)

    after_sync = guarded._take()

    assert [(w.job_id, end - start) for w, start, end in before_sync] == [("bulk", 8)]  # no sync yet: max batch
    assert [w.job_id for w, _, _ in sync_pass] == ["sync"]
    assert [(w.job_id, end - start) for w, start, end in after_sync] == [("bulk", 2)]


def test_busy_time_counts_overlapping_passes_once_and_the_pass_in_progress():
    from workers import batcher

    now = [100.0]
    busy = batcher.Busy(clock=lambda: now[0])
    with busy:  # the async lane's pass, 0 → 3 s
        now[0] += 1
        with busy:  # the sync lane's, 1 → 2 s, at the same time: not counted twice
            now[0] += 1
        now[0] += 1
    now[0] += 10  # idle
    assert busy.seconds() == 3.0
    busy.__enter__()  # a pass under way for 2 s so far counts already
    now[0] += 2
    assert busy.seconds() == 5.0


def test_only_the_async_lane_runs_passes_on_several_intra_op_threads(runtime):
    """One OpenMP team in the process (workers/runtime.py `pin_threads`): the thread that built the
    runtime is left on one intra-op thread, a sync-lane thread pins one, an async-lane thread all."""
    import torch

    seen = {}

    def lane(sync: bool) -> None:
        runtime.pin_threads(sync)
        runtime.predict([Decoded.of([1.0, 2.0, 3.0] * 20)], 4, [0.5])
        seen[sync] = torch.get_num_threads()

    for sync in (True, False):
        thread = threading.Thread(target=lane, args=(sync,))
        thread.start()
        thread.join()

    assert runtime.threads >= 1  # a CPU here
    assert seen == {True: 1, False: runtime.threads}


def test_a_repeated_pass_reuses_the_memory_of_the_last_one(runtime):
    """`keep_freed_memory` (called by the runtime): glibc's defaults gave a 64-series bolt-tiny pass
    12,000-22,000 page faults, each pass faulting in again what the last one freed."""
    import resource

    from workers.runtime import keep_freed_memory

    inputs = [Decoded.of([float((i + k) % 11) for i in range(512)]) for k in range(64)]
    runtime.predict(inputs, 20, [0.1, 0.5, 0.9])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    runtime.predict(inputs, 20, [0.1, 0.5, 0.9])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_memory()  # glibc here, and no MALLOC_* settings
    assert faults < 5_000


def test_an_operators_malloc_settings_are_left_alone(monkeypatch):
    from workers.runtime import keep_freed_memory

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")

    assert keep_freed_memory() is False


def test_dtype_bfloat16_on_a_cpu_serves_forecasts_close_to_float32(runtime, redis_server, synthetic_dir):
    """DTYPE=bfloat16 (opt-in on a CPU; shared/settings.py): the model runs in bfloat16 and its
    forecasts stay close to the float32 runtime's."""
    import torch

    settings = settings_for(
        redis_server, weights="synthetic", synthetic_dir=str(synthetic_dir), max_batch=8, dtype="bfloat16"
    )
    spec = catalog.get(BOLT)
    half = ModelRuntime(spec, resolve(spec, settings), settings)
    inputs = [Decoded.of([float((t * 3) % 11 + k) for t in range(48)]) for k in range(4)]

    ours, full = half.predict(inputs, 4, [0.5]), runtime.predict(inputs, 4, [0.5])

    assert half.dtype is torch.bfloat16 and runtime.dtype is torch.float32
    assert next(half.pipeline.inner_model.parameters()).dtype is torch.bfloat16
    for a, b in zip(ours, full, strict=True):
        assert a.dtype == np.float32 and a.tolist() != b.tolist()  # computed in bfloat16, answered as float32
        assert level(a, [0.5], 0.5) == pytest.approx(level(b, [0.5], 0.5), rel=2e-2)
