"""How long the API holds a model's small async jobs before their shared message is sent
(api/sender.py): the short window for a job that comes alone, the busy window under a stream."""

from __future__ import annotations

import asyncio

from shared import catalog
from shared.store import Lane, keys

from api import sender
from api.sender import Sender, _Arrivals

BOLT = catalog.get("amazon/chronos-bolt-tiny")


def busy(arrivals: _Arrivals, window: float, times: list[float]) -> list[bool]:
    """For each arrival time, whether a message opened then would take the busy window."""
    return [2 * arrivals.note(t) <= window for t in times]


def test_jobs_one_after_another_never_count_as_busy():
    # A client sending its next job once the last has come back: 300 ms apart, busy window 20 ms.
    assert busy(_Arrivals(0.04), 0.02, [0.3 * i for i in range(50)]) == [False] * 50


def test_a_flood_after_a_quiet_hour_is_recognised_within_a_few_jobs():
    arrivals = _Arrivals(0.04)
    busy(arrivals, 0.02, [0.0, 3600.0])  # one job an hour ago, one now
    flood = busy(arrivals, 0.02, [3600 + 0.001 * i for i in range(1, 40)])
    assert not flood[0] and flood.index(True) <= 10 and all(flood[flood.index(True) :])


def test_a_flood_in_bursts_stays_busy_through_the_pauses_between_them():
    # Closed-loop clients answered together after each pass come back together: 40 jobs 1 ms
    # apart, then 120 ms of nothing, again and again.
    times = [burst * 0.16 + 0.001 * i for burst in range(5) for i in range(40)]
    flags = busy(_Arrivals(0.04), 0.02, times)
    assert all(flags[40:])  # after the first burst, every job is sent in a long-open message


def test_the_first_job_after_a_flood_and_a_quiet_spell_goes_alone():
    arrivals = _Arrivals(0.04)
    flood = busy(arrivals, 0.02, [0.001 * i for i in range(50)])
    assert flood[-1]
    assert busy(arrivals, 0.02, [3600.0]) == [False]


def test_a_lone_job_waits_the_short_window_and_jobs_of_a_stream_the_busy_one(monkeypatch):
    sent: list[list[str]] = []

    async def publish(client, spec, ids):
        sent.append(list(ids))

    monkeypatch.setattr(sender, "publish", publish)

    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        s = Sender(None, window_s=0.002, max_jobs=64, busy_window_s=5.0)  # type: ignore[arg-type]
        lone = asyncio.create_task(s.send(BOLT, "lone"))
        await asyncio.sleep(0)
        lone_window = s._open[BOLT.id].timer.when() - loop.time()
        await lone
        # A stream: jobs a few microseconds apart. They fill the message open now, and the next
        # message opened for them stays open the busy window.
        stream = [asyncio.create_task(s.send(BOLT, f"job-{i}")) for i in range(10)]
        await asyncio.sleep(0)
        await s.close()  # sends what is held
        await asyncio.gather(*stream)
        more = asyncio.create_task(s.send(BOLT, "next"))
        await asyncio.sleep(0)
        busy_window = s._open[BOLT.id].timer.when() - loop.time()
        await s.close()
        await more
        return lone_window, busy_window

    lone_window, busy_window = asyncio.run(scenario())
    assert lone_window <= 0.002 and busy_window > 4.0
    assert sent == [["lone"], [f"job-{i}" for i in range(10)], ["next"]]


def test_only_small_async_jobs_wait_for_a_shared_message():
    s = Sender(None, window_s=0.002, max_jobs=64)  # type: ignore[arg-type]
    assert s.alone(BOLT, Lane.ASYNC) is None
    assert s.alone(BOLT, Lane.SYNC) == keys.sync_queue(BOLT)
    assert s.alone(BOLT, Lane.ASYNC, small=False) == keys.queue(BOLT)
    assert s.alone(BOLT, Lane.ASYNC, queue="bolt.rev-1") == "bolt.rev-1"
    assert Sender(None, window_s=0.0, max_jobs=64).alone(BOLT, Lane.ASYNC) == keys.queue(BOLT)  # type: ignore[arg-type]
